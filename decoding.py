"""
The bookkeeping every decoder in orthrus.py shares, kept out of the algorithm's reading path:
input checks, the stopping rules (`Committer`), the statistics (`DecodeStats`), device sync.
"""

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from errors import UserError


def prepack_bf16_linears(*modules) -> int:
    """Decoding in bfloat16 on a CPU with native bf16 (oneDNN, AMX): lay every Linear's weight out
    for oneDNN ONCE. A plain bf16 F.linear re-lays the weight on every call, which made the
    one-token step slower than float32's; prepacked, it is faster, and a 16-row pass costs about a
    one-row one. Inference only (the packed copy does not follow later weight updates). Returns
    the number of layers prepacked (0 where oneDNN cannot)."""
    linears = [m for module in modules for m in module.modules() if isinstance(m, nn.Linear)
               and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]
    if not linears or not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return 0
    for linear in linears:
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        linear.forward = functools.partial(_prepacked_linear, packed, linear.bias)
    return len(linears)


def _prepacked_linear(packed, bias, x):
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def check_prompt(config, prompt: list, max_new_tokens: int = 1):
    """User errors in a decode's input, one line each."""
    if len(prompt) == 0:
        raise UserError("the prompt encodes to zero tokens; give at least one character")
    if len(prompt) >= config.context_len:
        raise UserError(f"the prompt is {len(prompt)} tokens but the context holds {config.context_len} "
                        f"(and needs room for at least one new token); shorten the prompt")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def start_decode(base, prompt: list, max_new_tokens: int, eos_ids, on_tokens, method: str):
    """Check a decode's input and set up its Committer and stats."""
    check_prompt(base.config, prompt, max_new_tokens)
    stats = DecodeStats(method, len(prompt))
    return Committer(stats, prompt, base.config.context_len, max_new_tokens, eos_ids, on_tokens), stats


@dataclass
class DecodeStats:
    """What a decode did. A cycle is one verify pass of the base (AR: one forward per token);
    the prefill's token is not part of any cycle."""

    method: str
    prompt_tokens: int
    new_tokens: int = 0
    forward_passes: int = 0  # decoding passes after prefill, of any model (Orthrus: draft + verify)
    drafted_per_cycle: list = field(default_factory=list)
    accepted_per_cycle: list = field(default_factory=list)
    stop_reason: str = ""  # "max_new_tokens", "eos" or "context_limit"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    def record_cycle(self, drafted: int, accepted: int, passes: int):
        self.drafted_per_cycle.append(drafted)
        self.accepted_per_cycle.append(accepted)
        self.forward_passes += passes

    @property
    def cycles(self) -> int:
        return len(self.accepted_per_cycle)

    @property
    def cycle_tokens(self) -> int:
        """Tokens committed by cycles (all but the prefill's)."""
        return max(0, self.new_tokens - 1)

    @property
    def tokens_per_cycle(self) -> float:
        """Committed tokens per verify pass (the definition in docs/method.md)."""
        return self.cycle_tokens / max(1, self.cycles)

    @property
    def tokens_per_forward(self) -> float:
        """Committed tokens per decoding forward pass, every model's passes counted."""
        return self.cycle_tokens / max(1, self.forward_passes)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(1e-9, self.prefill_seconds + self.decode_seconds)


class Committer:
    """Appends committed tokens under the same stopping rules for every decoder: at most
    max_new_tokens, never past the context length (a clean stop, reported), and stop after any
    end-of-text id. `sequence` is prompt + committed tokens (drafters read it, never write it)."""

    def __init__(self, stats: DecodeStats, prompt: list, context_len: int, max_new_tokens: int, eos_ids, on_tokens):
        self.stats, self.eos_ids, self.on_tokens = stats, frozenset(eos_ids), on_tokens
        self.sequence, self.n_prompt = list(prompt), len(prompt)
        self.max_new_tokens = max_new_tokens
        self.limit = min(max_new_tokens, context_len - len(prompt))

    @property
    def tokens(self) -> list:
        return self.sequence[self.n_prompt :]

    @property
    def room(self) -> int:
        return self.limit - (len(self.sequence) - self.n_prompt)

    def add(self, new_tokens: list) -> bool:
        """Commit tokens in order; True when decoding must stop."""
        new_tokens = new_tokens[: self.room]
        end = next((i for i, t in enumerate(new_tokens) if t in self.eos_ids), None)
        if end is not None:
            new_tokens = new_tokens[: end + 1]
            self.stats.stop_reason = "eos"
        self.sequence.extend(new_tokens)
        self.stats.new_tokens = len(self.sequence) - self.n_prompt
        if self.on_tokens is not None and new_tokens:
            self.on_tokens(new_tokens)
        if not self.stats.stop_reason and self.room == 0:
            self.stats.stop_reason = "max_new_tokens" if self.limit == self.max_new_tokens else "context_limit"
        return bool(self.stats.stop_reason)


def sync_device(device: torch.device):
    """Wait for queued GPU work, so timers measure it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

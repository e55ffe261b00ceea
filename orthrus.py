"""
Orthrus = a frozen AR GPT (model.py) + its diffusion view (diffusion_head.py), decoding with the
shared-cache parallel sampler of arXiv 2605.12825 (Sec. 3.2, Algorithm 1). Plain autoregressive
decoding (`generate`) lives here too, next to it, so the two loops can be read side by side and
compared token for token.

One Orthrus cycle, the whole method:

    prefill:  the AR view runs over the prompt, writing cache[0, s); its last logits give the
              first new token x_s, which is committed but "pending" (not yet in the cache)
    repeat:
      draft   the diffusion view runs once over [x_s, MASK x (K-1)] at positions s..s+K-1,
              reading the AR cache of [0, s) in place and writing nothing: drafts d_1..d_{K-1}
      verify  the AR view runs once over [x_s, d_1..d_{K-1}], writing cache[s, s+K)
      accept  consensus.py: the longest agreed prefix d_1..d_n plus one token from the AR view
              (the bonus, or the correction at the first disagreement)
      commit  stream d_1..d_n, next; crop the cache to s+1+n (x_s and the accepted drafts stay,
              the rejected tail is dropped); `next` is the new pending token

The only persistent state is the AR view's KV cache; the diffusion view adds the transient K/V of
one block of K tokens per layer (`transient_draft_bytes`).
"""

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from consensus import greedy_verify, speculative_verify
from diffusion_head import DiffusionHead
from model import GPT
from sampling import check_sampling_args, greedy, logits_to_probs, sample_from


class Orthrus(nn.Module):
    """The dual-view model: the base GPT (frozen, shared) and the diffusion head (trainable)."""

    def __init__(self, base: GPT, head: DiffusionHead):
        super().__init__()
        self.base = base.requires_grad_(False).eval()
        self.head = head

    @torch.no_grad()
    def draft(self, cache, pending: int, draft_len: int, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, generator=None, denoise_steps: int = 1):
        """Draft K-1 tokens after the pending token with the diffusion view.

        Returns (drafts (K-1,) long, p_draft (K-1, V) or None when greedy): p_draft row j is the
        exact distribution d_{j+1} was sampled from, as speculative sampling requires.
        One step (the paper's choice): every MASK is filled from ONE pass."""
        K = draft_len
        block = torch.full((1, K), self.head.mask_id, dtype=torch.long, device=cache.k.device)
        block[0, 0] = pending  # [x_s, MASK x (K-1)]
        if denoise_steps > 1:
            return self._draft_several_steps(cache, block, temperature, top_k, top_p, generator, denoise_steps)
        logits = self.head.draft_logits(self.base, cache, block)[0, : K - 1]  # row j drafts block index j+1
        if temperature == 0:
            return greedy(logits), None
        p_draft = logits_to_probs(logits, temperature, top_k, top_p)
        return sample_from(p_draft, generator), p_draft

    def _draft_several_steps(self, cache, block, temperature, top_k, top_p, generator, denoise_steps):
        """The paper's multi-step ablation: each pass fixes the still-masked positions the head is
        most confident about, ceil(remaining / steps_left) of them; the next pass sees them as
        ordinary tokens. A token's p_draft row is the distribution it was drawn from, in its pass."""
        K, sampling = block.size(1), temperature > 0
        drafts = torch.zeros(K - 1, dtype=torch.long, device=block.device)
        p_draft = None
        still_masked = torch.ones(K - 1, dtype=torch.bool, device=block.device)  # over block indices 1..K-1
        for step in range(denoise_steps):
            logits = self.head.draft_logits(self.base, cache, block)[0, : K - 1]
            if sampling:
                probs = logits_to_probs(logits, temperature, top_k, top_p)
                tokens = sample_from(probs, generator)
            else:
                probs, tokens = None, greedy(logits)
            steps_left = denoise_steps - step
            if steps_left == 1:
                chosen = still_masked.clone()
            else:  # confidence-ordered unmasking
                confidence = (probs if sampling else torch.softmax(logits, -1)).max(-1).values
                confidence = confidence.masked_fill(~still_masked, -1.0)
                n_fix = math.ceil(int(still_masked.sum()) / steps_left)
                chosen = torch.zeros_like(still_masked)
                chosen[confidence.topk(n_fix).indices] = True
                chosen &= still_masked
            drafts = torch.where(chosen, tokens, drafts)
            if sampling:
                p_draft = probs if p_draft is None else torch.where(chosen[:, None], probs, p_draft)
            block[0, 1:] = torch.where(chosen, tokens, block[0, 1:])
            still_masked &= ~chosen
            if not bool(still_masked.any()):
                break
        return drafts, p_draft


def transient_draft_bytes(config, draft_len: int, dtype=torch.float32) -> int:
    """K/V the diffusion view holds for one draft block while it runs (all layers, K and V).
    It is freed after the pass and does not grow with the context (PAPER.md "Memory")."""
    element = torch.tensor([], dtype=dtype).element_size()
    return config.n_layer * 2 * draft_len * config.n_kv_head * config.head_dim * element


# ---------------------------------------------------------------------------------------------
# Shared by both decoders: input checks, token choice, stopping rules, statistics


@dataclass
class DecodeStats:
    """What a decode did. A 'cycle' is one draft+verify pair for Orthrus and one forward for AR."""

    method: str
    prompt_tokens: int
    new_tokens: int = 0
    cycles: int = 0
    forward_passes: int = 0  # decoding passes after prefill (Orthrus: draft + verify per cycle)
    committed_per_cycle: list = field(default_factory=list)
    accepted_per_cycle: list = field(default_factory=list)  # accepted drafts (Orthrus)
    drafted_per_cycle: list = field(default_factory=list)
    stop_reason: str = ""  # "max_new_tokens", "eos" or "context_limit"
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def tokens_per_cycle(self) -> float:
        """Committed tokens per draft+verify cycle (the first token comes from prefill: not counted)."""
        return sum(self.committed_per_cycle) / max(1, self.cycles)

    @property
    def tokens_per_forward(self) -> float:
        """Committed tokens per decoding forward pass, both Orthrus passes counted."""
        return sum(self.committed_per_cycle) / max(1, self.forward_passes)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(1e-9, self.prefill_seconds + self.decode_seconds)


def check_decode_args(model_cfg, prompt, max_new_tokens, temperature, top_k, top_p):
    check_sampling_args(temperature, top_k, top_p)
    if len(prompt) == 0:
        raise ValueError("the prompt encodes to zero tokens; give at least one character")
    if len(prompt) >= model_cfg.context_len:
        raise ValueError(f"the prompt is {len(prompt)} tokens but the context holds {model_cfg.context_len} "
                         f"(and needs room for at least one new token); shorten the prompt")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


class Committer:
    """Appends committed tokens and applies the same stopping rules for every decoder: at most
    max_new_tokens, never past the context length (a clean stop, reported), and stop after the
    end-of-text id."""

    def __init__(self, stats: DecodeStats, context_len: int, max_new_tokens: int, eos_id, on_tokens):
        self.stats, self.eos_id, self.on_tokens = stats, eos_id, on_tokens
        self.max_new_tokens = max_new_tokens
        self.limit = min(max_new_tokens, context_len - stats.prompt_tokens)
        self.tokens = []

    @property
    def room(self) -> int:
        return self.limit - len(self.tokens)

    def commit(self, new_tokens: list) -> bool:
        """Commit tokens in order; True when decoding must stop."""
        new_tokens = new_tokens[: self.room]
        if self.eos_id is not None and self.eos_id in new_tokens:
            new_tokens = new_tokens[: new_tokens.index(self.eos_id) + 1]
            self.stats.stop_reason = "eos"
        self.tokens.extend(new_tokens)
        self.stats.new_tokens = len(self.tokens)
        if self.on_tokens is not None and new_tokens:
            self.on_tokens(new_tokens)
        if not self.stats.stop_reason and self.room == 0:
            self.stats.stop_reason = "max_new_tokens" if self.limit == self.max_new_tokens else "context_limit"
        return bool(self.stats.stop_reason)


def choose_token(logits, temperature, top_k, top_p, generator) -> int:
    """One token from one row of logits: argmax when greedy, else a warped sample."""
    if temperature == 0:
        return int(greedy(logits))
    return int(sample_from(logits_to_probs(logits, temperature, top_k, top_p), generator))


def sync_device(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def prefill(base: GPT, prompt: list, extra: int, temperature, top_k, top_p, generator):
    """The AR view over the prompt: a new cache holding [0, s) (with `extra` slots of room for a
    block) and the first new token, committed but pending (not yet in the cache).
    Returns (cache, pending token, seconds)."""
    device = base.lm_head.weight.device
    t0 = time.perf_counter()
    cache = base.new_cache(extra=extra)
    logits = base(torch.tensor([prompt], device=device), cache, logits="last")[0, -1]
    pending = choose_token(logits, temperature, top_k, top_p, generator)
    sync_device(device)
    return cache, pending, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Plain autoregressive decoding (the baseline and the reference)


@torch.no_grad()
def generate(model: GPT, prompt: list, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, generator=None, eos_id=None, on_tokens=None, use_cache: bool = True):
    """Autoregressive decoding, one token per forward. With use_cache=False every step recomputes
    the whole prefix (the naive baseline the KV cache is measured against).
    Returns (new token ids, DecodeStats); on_tokens(list) streams tokens as they are committed."""
    cfg = model.config
    check_decode_args(cfg, prompt, max_new_tokens, temperature, top_k, top_p)
    device = model.lm_head.weight.device
    stats = DecodeStats("ar" if use_cache else "ar-nocache", len(prompt))
    out = Committer(stats, cfg.context_len, max_new_tokens, eos_id, on_tokens)
    seq = torch.tensor([prompt], dtype=torch.long, device=device)
    t0 = time.perf_counter()
    cache = model.new_cache(extra=0) if use_cache else None
    logits = model(seq, cache, logits="last")[0, -1]
    token = choose_token(logits, temperature, top_k, top_p, generator)
    sync_device(device)
    stats.prefill_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    done = out.commit([token])
    while not done:
        if use_cache:
            logits = model(torch.tensor([[token]], device=device), cache, logits="last")[0, -1]
        else:
            seq = torch.cat([seq, torch.tensor([[token]], device=device)], 1)
            logits = model(seq, logits="last")[0, -1]
        token = choose_token(logits, temperature, top_k, top_p, generator)
        stats.cycles += 1
        stats.forward_passes += 1
        stats.committed_per_cycle.append(1)
        done = out.commit([token])
    sync_device(device)
    stats.decode_seconds = time.perf_counter() - t0
    return out.tokens, stats


# ---------------------------------------------------------------------------------------------
# Orthrus: draft -> verify -> accept -> commit -> crop, over one shared KV cache


@torch.no_grad()
def generate_orthrus(model: Orthrus, prompt: list, max_new_tokens: int, draft_len: int = 16,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator=None,
                     eos_id=None, on_tokens=None, denoise_steps: int = 1, on_cycle=None):
    """Orthrus decoding. Output equals `generate(model.base, ...)` token for token when greedy
    (in float32/float64), and follows the same distribution when sampling.
    on_cycle(dict) receives each cycle's drafts, accepted count and next token (for --trace).
    Returns (new token ids, DecodeStats)."""
    base, cfg = model.base, model.base.config
    check_decode_args(cfg, prompt, max_new_tokens, temperature, top_k, top_p)
    if draft_len < 2:
        raise ValueError(f"draft length must be >= 2 (the pending token plus at least one draft), got {draft_len}")
    if denoise_steps < 1:
        raise ValueError(f"denoise_steps must be >= 1, got {denoise_steps}")
    device = base.lm_head.weight.device
    sampling = temperature > 0
    stats = DecodeStats("orthrus", len(prompt))
    out = Committer(stats, cfg.context_len, max_new_tokens, eos_id, on_tokens)

    # Prefill with the AR view only (time to first token is plain AR's).
    cache, pending, stats.prefill_seconds = prefill(base, prompt, draft_len, temperature, top_k, top_p, generator)
    t0 = time.perf_counter()
    done = out.commit([pending])

    while not done:
        s = cache.length  # position of the pending token; cache holds [0, s)
        # A cycle commits at most K tokens: near the end, draft only what can still be committed.
        K = min(draft_len, max(2, out.room))

        # 1. Draft: one pass of the diffusion view over [x_s, MASK x (K-1)]; the cache is only read.
        drafts, p_draft = model.draft(cache, pending, K, temperature, top_k, top_p, generator, denoise_steps)

        # 2. Verify: one pass of the AR view over [x_s, d_1..d_{K-1}]; writes cache[s, s+K).
        block = torch.cat([torch.tensor([pending], device=device), drafts]).view(1, K)
        target_logits = base(block, cache, logits="all")[0]  # (K, V): row i -> position s+i+1

        # 3. Consensus: longest agreed prefix + one token from the AR view.
        if sampling:
            p_target = logits_to_probs(target_logits, temperature, top_k, top_p)
            n_accepted, next_token = speculative_verify(drafts, p_draft, p_target, generator)
        else:
            n_accepted, next_token = greedy_verify(drafts, greedy(target_logits))

        # 4. Commit and crop: x_s and the accepted drafts stay in the cache; next_token is pending.
        cache.crop(s + 1 + n_accepted)
        n_before = len(out.tokens)
        done = out.commit(drafts[:n_accepted].tolist() + [next_token])
        pending = next_token

        stats.cycles += 1
        stats.forward_passes += min(denoise_steps, K - 1) + 1  # draft passes + the verify pass
        stats.accepted_per_cycle.append(n_accepted)
        stats.drafted_per_cycle.append(K - 1)
        stats.committed_per_cycle.append(len(out.tokens) - n_before)
        if on_cycle is not None:
            on_cycle({"pending": block[0, 0].item(), "drafts": drafts.tolist(), "accepted": n_accepted, "next": next_token})
    sync_device(device)
    stats.decode_seconds = time.perf_counter() - t0
    return out.tokens, stats

"""
The two drafters Orthrus is compared with in bench.py, behind the drafter interface of orthrus.py
(max_drafts, start, propose, rollback). Each proposes tokens that the SAME loop and verifier
(orthrus.generate_speculative, consensus.py) check against the AR model, so every one of them is
exact: greedy output equals greedy AR, sampled output follows the AR distribution.

  draft model    classic speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small
                 separate GPT, trained on the same data (`train.py --preset draft`), drafts gamma
                 tokens one at a time with its OWN KV cache. That cache persists between cycles
                 and grows with the context: the memory Orthrus does not need.
  prompt lookup  training-free n-gram drafting (Saxena 2023): find the latest earlier occurrence
                 of the last n committed tokens and propose the tokens that followed it. No
                 parameters, no cache; drafts are deterministic (a point mass when sampling).
"""

import torch

from errors import UserError
from model import GPT, kv_bytes
from orthrus import Proposal
from sampling import Sampling


class DraftModelDrafter:
    """Two-model speculative decoding: a small GPT drafts autoregressively with its own KV cache."""

    name = "draft-model"

    def __init__(self, draft_model: GPT, gamma: int, base_config=None):
        if gamma < 1:
            raise UserError(f"gamma (tokens drafted per cycle) must be >= 1, got {gamma}")
        c = draft_model.config
        if base_config is not None:
            if c.vocab_size != base_config.vocab_size:
                raise UserError(f"the draft model's vocabulary ({c.vocab_size}) is not the base's "
                                f"({base_config.vocab_size}): train it on the same prepared data")
            if c.context_len < base_config.context_len:
                raise UserError(f"the draft model's context ({c.context_len}) is shorter than the base's "
                                f"({base_config.context_len}): train it with --context-len {base_config.context_len}")
        self.model, self.max_drafts = draft_model.eval(), gamma
        self.cache = None

    def start(self, prompt: list, capacity: int) -> None:
        self.cache = self.model.new_cache(capacity=capacity)  # sized to the job, like the base's

    @torch.no_grad()
    def propose(self, cache, sequence: list, n: int, sampling: Sampling) -> Proposal:
        """Draft n tokens after `sequence` (the committed tokens; the last one is pending), one
        step of the small model each, with its own cache (the base's `cache` is not needed)."""
        model, own = self.model, self.cache
        device = model.lm_head.weight.device
        # Catch up: one pass over the committed tokens this cache has not seen (at least the
        # pending one; after a fully accepted cycle also the last draft, which was never fed).
        fresh = torch.tensor([sequence[own.length:]], device=device)
        logits = model(fresh, own, logits="last")[0, -1]
        drafts, probs = [], []
        for i in range(n):
            p = None if sampling.is_greedy else sampling.probs(logits)
            token = sampling.choose(logits) if p is None else sampling.draw(p)
            drafts.append(token)
            probs.append(p)
            if i + 1 < n:  # the last draft is not fed: its K/V would only be needed if all are accepted
                logits = model(token.view(1, 1), own, logits="last")[0, -1]
        p_draft = None if sampling.is_greedy else torch.stack(probs)
        return Proposal(torch.stack(drafts).view(n), p_draft, n)

    def rollback(self, n_valid: int) -> None:
        """Only positions < n_valid hold committed tokens now; forget the rest."""
        self.cache.crop(min(self.cache.length, n_valid))

    def persistent_bytes(self, context_positions: int) -> int:
        """Bytes of the draft model's KV cache holding `context_positions` tokens: it grows with
        the context, and is kept between cycles."""
        return kv_bytes(self.model.config, context_positions, self.model.lm_head.weight.dtype)

    def transient_bytes(self) -> int:
        return 0

    def extra_params(self) -> int:
        return self.model.num_params()


class PromptLookupDrafter:
    """Prompt-lookup (n-gram) drafting: copy what followed the latest earlier match of the
    sequence's last n tokens, trying n = max_ngram down to min_ngram. Nothing matched -> no
    drafts (the cycle is then a plain AR step)."""

    name = "prompt-lookup"

    def __init__(self, gamma: int, max_ngram: int = 3, min_ngram: int = 1):
        if gamma < 1:
            raise UserError(f"gamma (tokens drafted per cycle) must be >= 1, got {gamma}")
        if not 1 <= min_ngram <= max_ngram:
            raise UserError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_drafts, self.max_ngram, self.min_ngram = gamma, max_ngram, min_ngram

    def start(self, prompt: list, capacity: int) -> None:
        pass

    def lookup(self, tokens: list, n: int) -> list:
        """Up to n tokens that followed the most recent earlier occurrence of the longest
        matching suffix of `tokens` (plain Python: sequences here are <= a few thousand tokens)."""
        L = len(tokens)
        for size in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            suffix = tokens[L - size:]
            for start in range(L - size - 1, -1, -1):  # latest match first, never the suffix itself
                if tokens[start : start + size] == suffix:
                    return tokens[start + size : start + size + n]
        return []

    def propose(self, cache, sequence: list, n: int, sampling: Sampling) -> Proposal:
        """Deterministic drafts: p_draft None (the decode loop treats them as a point mass)."""
        return Proposal(torch.tensor(self.lookup(sequence, n), dtype=torch.long), None, 0)

    def rollback(self, n_valid: int) -> None:
        pass

    def persistent_bytes(self, context_positions: int) -> int:
        return 0  # it reads the token ids the decoder already keeps

    def transient_bytes(self) -> int:
        return 0

    def extra_params(self) -> int:
        return 0

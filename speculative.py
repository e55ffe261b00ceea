"""
The two drafters Orthrus is compared with in bench.py. Each proposes tokens that the SAME
verifier (consensus.py) then checks against the AR model, so every one of them is exact: greedy
output equals greedy AR, sampled output follows the AR distribution.

  draft model    classic speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small
                 separate GPT, trained on the same data (`train.py --preset draft`), drafts gamma
                 tokens one at a time with its OWN KV cache. That cache persists between cycles
                 and grows with the context: the memory Orthrus does not need.
  prompt lookup  training-free n-gram drafting (Saxena 2023): find the latest earlier occurrence
                 of the last n committed tokens and propose the tokens that followed it. No
                 parameters, no cache; drafts are deterministic (a point mass when sampling).

One cycle of `generate_speculative` is the Orthrus cycle (orthrus.py) with the drafter swapped:

    propose  the drafter proposes g <= gamma tokens d_1..d_g after the committed sequence
             (whose last token x_s is pending: committed but not yet in the AR cache)
    verify   the AR model runs once over [x_s, d_1..d_g], writing cache[s, s+g+1)
    accept   consensus.py: the longest agreed prefix d_1..d_n plus one token from the AR model
    commit   crop the AR cache to s+1+n; the drafter drops whatever it holds past that point
"""

import time

import torch
import torch.nn.functional as F

from consensus import greedy_verify, speculative_verify
from model import GPT
from orthrus import Committer, DecodeStats, check_decode_args, prefill, sync_device
from sampling import greedy, logits_to_probs, sample_from


class DraftModelDrafter:
    """Two-model speculative decoding: a small GPT drafts autoregressively with its own KV cache."""

    name = "draft-model"

    def __init__(self, draft_model: GPT, gamma: int, base_config=None):
        if gamma < 1:
            raise ValueError(f"gamma (tokens drafted per cycle) must be >= 1, got {gamma}")
        c = draft_model.config
        if base_config is not None:
            if c.vocab_size != base_config.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({c.vocab_size}) is not the base's "
                                 f"({base_config.vocab_size}): train it on the same prepared data")
            if c.context_len < base_config.context_len:
                raise ValueError(f"the draft model's context ({c.context_len}) is shorter than the base's "
                                 f"({base_config.context_len}): train it with --context-len {base_config.context_len}")
        self.model, self.gamma = draft_model.eval(), gamma
        self.cache = None

    def start(self, prompt: list) -> None:
        self.cache = self.model.new_cache(extra=self.gamma + 1)

    def propose(self, tokens: list, n: int, temperature: float, top_k: int, top_p: float, generator):
        """Draft n tokens after `tokens` (the committed sequence; its last token is pending).
        Returns (drafts (n,), p_draft (n, V) or None when greedy, forward passes used)."""
        model, cache = self.model, self.cache
        device = model.lm_head.weight.device
        if n == 0:  # the last token before a length limit: nothing to draft
            return torch.zeros(0, dtype=torch.long, device=device), None, 0
        # Catch up: one pass over the committed tokens this cache has not seen (at least the
        # pending one; after a fully accepted cycle also the last draft, which was never fed).
        fresh = torch.tensor([tokens[cache.length:]], device=device)
        logits = model(fresh, cache, logits="last")[0, -1]
        drafts, probs = [], []
        for i in range(n):
            if temperature == 0:
                token = greedy(logits)
            else:
                p = logits_to_probs(logits, temperature, top_k, top_p)
                token = sample_from(p, generator)
                probs.append(p)
            drafts.append(token)
            if i + 1 < n:  # the last draft is not fed: its K/V would only be needed if all are accepted
                logits = model(token.view(1, 1), cache, logits="last")[0, -1]
        p_draft = torch.stack(probs) if probs else None
        return torch.stack(drafts).view(n), p_draft, n

    def rollback(self, n_valid: int) -> None:
        """Only positions < n_valid hold committed tokens now; forget the rest."""
        self.cache.crop(min(self.cache.length, n_valid))

    def persistent_bytes(self, context_positions: int) -> int:
        """Bytes of the draft model's KV cache holding `context_positions` tokens: it grows with
        the context, and is kept between cycles."""
        c = self.model.config
        element = self.model.lm_head.weight.element_size()
        return c.n_layer * 2 * context_positions * c.n_kv_head * c.head_dim * element

    def extra_params(self) -> int:
        return self.model.num_params()


class PromptLookupDrafter:
    """Prompt-lookup (n-gram) drafting: copy what followed the latest earlier match of the
    sequence's last n tokens, trying n = max_ngram down to min_ngram. Nothing matched -> no
    drafts (the cycle is then a plain AR step)."""

    name = "prompt-lookup"

    def __init__(self, gamma: int, max_ngram: int = 3, min_ngram: int = 1):
        if gamma < 1:
            raise ValueError(f"gamma (tokens drafted per cycle) must be >= 1, got {gamma}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.gamma, self.max_ngram, self.min_ngram = gamma, max_ngram, min_ngram

    def start(self, prompt: list) -> None:
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

    def propose(self, tokens: list, n: int, temperature: float, top_k: int, top_p: float, generator):
        """Deterministic drafts: p_draft None (the decoder treats them as a point mass)."""
        return torch.tensor(self.lookup(tokens, n), dtype=torch.long), None, 0

    def rollback(self, n_valid: int) -> None:
        pass

    def persistent_bytes(self, context_positions: int) -> int:
        return 0  # it reads the token ids the decoder already keeps

    def extra_params(self) -> int:
        return 0


@torch.no_grad()
def generate_speculative(base: GPT, drafter, prompt: list, max_new_tokens: int, temperature: float = 0.0,
                         top_k: int = 0, top_p: float = 1.0, generator=None, eos_id=None, on_tokens=None,
                         on_cycle=None):
    """Speculative decoding of `base` with `drafter` (DraftModelDrafter or PromptLookupDrafter).
    Output equals `generate(base, ...)` token for token when greedy and follows the same
    distribution when sampling. Returns (new token ids, DecodeStats); stats.forward_passes counts
    the drafter's passes (of its own model) plus one verify pass per cycle."""
    cfg = base.config
    check_decode_args(cfg, prompt, max_new_tokens, temperature, top_k, top_p)
    device = base.lm_head.weight.device
    stats = DecodeStats(drafter.name, len(prompt))
    out = Committer(stats, cfg.context_len, max_new_tokens, eos_id, on_tokens)
    cache, pending, stats.prefill_seconds = prefill(base, prompt, drafter.gamma + 1, temperature, top_k, top_p, generator)
    drafter.start(prompt)
    t0 = time.perf_counter()
    done = out.commit([pending])

    while not done:
        s = cache.length  # position of the pending token; cache holds [0, s)
        g = min(drafter.gamma, out.room - 1)  # a cycle commits at most g+1 tokens

        # 1. Propose g tokens after the committed sequence (prompt + new tokens, pending last).
        drafts, p_draft, draft_passes = drafter.propose(prompt + out.tokens, g, temperature, top_k, top_p, generator)
        drafts = drafts.to(device)
        g = drafts.numel()  # prompt lookup may find fewer

        # 2. Verify: one AR pass over [x_s, d_1..d_g]; writes cache[s, s+g+1).
        block = torch.cat([torch.tensor([pending], device=device), drafts]).view(1, g + 1)
        target_logits = base(block, cache, logits="all")[0]

        # 3. Consensus (the same functions Orthrus uses).
        if temperature > 0:
            p_target = logits_to_probs(target_logits, temperature, top_k, top_p)
            if p_draft is None:  # a deterministic proposal (prompt lookup, or none): a point mass,
                # so a draft d is kept with probability p_target(d)
                p_draft = F.one_hot(drafts, p_target.size(1)).to(p_target.dtype)
            n_accepted, next_token = speculative_verify(drafts, p_draft.to(device), p_target, generator)
        else:
            n_accepted, next_token = greedy_verify(drafts, greedy(target_logits))

        # 4. Commit and crop, in the AR cache and the drafter's own state.
        cache.crop(s + 1 + n_accepted)
        drafter.rollback(s + 1 + n_accepted)
        n_before = len(out.tokens)
        done = out.commit(drafts[:n_accepted].tolist() + [next_token])
        pending = next_token

        stats.cycles += 1
        stats.forward_passes += draft_passes + 1
        stats.accepted_per_cycle.append(n_accepted)
        stats.drafted_per_cycle.append(g)
        stats.committed_per_cycle.append(len(out.tokens) - n_before)
        if on_cycle is not None:
            on_cycle({"pending": int(block[0, 0]), "drafts": drafts.tolist(), "accepted": n_accepted, "next": next_token})
    sync_device(device)
    stats.decode_seconds = time.perf_counter() - t0
    return out.tokens, stats

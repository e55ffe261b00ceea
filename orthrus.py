"""
Orthrus decoding (arXiv 2605.12825, Sec. 3.2, Algorithm 1): a frozen AR GPT (model.py) drafts
with its diffusion view (diffusion_head.py) and verifies with its AR view, over ONE KV cache.
Plain autoregressive decoding (`generate`, and `generate_batch` for many prompts) lives here too.

One cycle of `generate_speculative`, after the prefill wrote cache[0, s) and chose x_s (pending):
  draft    the diffusion view runs once over [x_s, MASK x (K-1)], reading the cache in place and
           writing nothing: drafts d_1..d_{K-1}
  verify   the AR view runs once over [x_s, d_1..d_{K-1}], writing cache[s, s+K)
  accept   consensus.py: the longest agreed prefix d_1..d_n plus one token of the AR view
  commit   crop the cache to s+1+n; the AR view's token is the new pending one

The loop takes any *drafter* (the diffusion view; benchmarks/drafters.py holds the baselines):
    max_drafts                  the most tokens it proposes per cycle (Orthrus: K-1)
    start(prompt, capacity)     forget earlier state; at most `capacity` positions will be committed
    propose(cache, sequence, n, sampling) -> Proposal(tokens, p_draft, passes)
                                n drafts after `sequence` (its last token pending), the law each
                                was drawn from (None: deterministic), the forward passes spent,
                                and for a token tree each node's parent (greedy only)
    rollback(n_valid)           only sequence[:n_valid] is committed now
    verify(cache, block)        optional: run the verify pass itself (drafting the next block in it)
Orthrus keeps no state between cycles: the AR view's cache is its only persistent memory.
Two levers for more tokens per forward pass ride on the same loop (tree_and_fused.py): a token
tree verified in one pass, and the next draft made inside the verify pass.
"""
import math
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from consensus import greedy_verify, greedy_verify_tree, speculative_verify
from decoding import start_decode, sync_device
from diffusion_head import DRAFT_LEN, DiffusionHead, check_draft_lens
from errors import UserError
from model import GPT, kv_bytes, tree_layout
from sampling import GREEDY, Sampling, greedy


class Proposal(NamedTuple):
    tokens: torch.Tensor  # (n,) long: drafts d_1..d_n for positions s+1..s+n
    p_draft: torch.Tensor | None  # (n, V): the distribution each draft was drawn from; None = deterministic
    passes: int  # forward passes the drafter spent on them
    parents: list | None = None  # a token tree: node i continues node parents[i] (-1: x_s); None = a chain


NO_DRAFTS = Proposal(torch.zeros(0, dtype=torch.long), None, 0)  # a cycle with room for one token


# ---------------------------------------------------------------------------------------------
# Orthrus (and every other drafter): draft -> verify -> accept -> commit -> crop, over one cache


@torch.no_grad()
def generate_speculative(base: GPT, drafter, prompt: list, max_new_tokens: int, sampling: Sampling = GREEDY,
                         eos_ids=(), on_tokens=None, on_cycle=None):
    """Decode `base` with `drafter` proposing tokens and the base verifying them. Output equals
    `generate(base, ...)` token for token when greedy (in float32/float64), and follows the same
    distribution when sampling. on_cycle(dict) receives each cycle's drafts, accepted count and
    next token (sample.py --trace). Returns (new token ids, DecodeStats)."""
    committed, stats = start_decode(base, prompt, max_new_tokens, eos_ids, on_tokens, drafter.name)
    # a token tree's verify block may be wider than the tokens a cycle can commit: room for it
    spare = getattr(drafter, "max_tree_nodes", 0)
    cache, pending, stats.prefill_seconds = prefill(base, prompt, committed.limit + spare, sampling)  # AR view only
    drafter.start(prompt, len(prompt) + committed.limit)
    t0 = time.perf_counter()
    done = committed.add([pending])

    while not done:
        s = cache.length  # position of the pending token x_s; the cache holds [0, s)
        n = min(drafter.max_drafts, committed.room - 1)  # a cycle commits at most n + 1 tokens

        # 1. Draft n tokens for positions s+1..s+n (the diffusion view: one pass, cache only read).
        #    A tree drafter proposes several candidates per position, each node continuing its parent.
        drafts, p_draft, draft_passes, parents = drafter.propose(cache, committed.sequence, n, sampling) if n else NO_DRAFTS
        drafts = drafts.to(cache.k.device)
        n = drafts.numel()  # prompt lookup may find fewer

        # 2. Verify: one pass of the AR view over [x_s, d_1..d_n]; writes cache[s, s+n+1). A tree is
        #    verified in the same single pass, each node seeing only its own path (model.tree_layout).
        block = torch.cat([drafts.new_tensor([pending]), drafts]).view(1, n + 1)
        tree = None if parents is None else tree_layout(parents, block.device)
        if getattr(drafter, "verify", None) is not None:  # it drafts the next block in this same pass
            assert parents is None, "a drafter that runs the verify pass itself proposes chains"
            target_logits = drafter.verify(cache, block)
        else:
            target_logits = base(block, cache, logits="all", tree=tree)[0]  # (n+1, V): row i follows block token i

        # 3. Consensus: the longest agreed prefix (a tree: path) + one token from the AR view.
        if parents is not None:  # tree drafters propose trees only when greedy
            path, next_token = greedy_verify_tree(drafts.tolist(), parents, greedy(target_logits).tolist())
        elif sampling.is_greedy:
            n_accepted, next_token = greedy_verify(drafts, greedy(target_logits))
            path = list(range(n_accepted))
        else:
            p_target = sampling.probs(target_logits)
            if p_draft is None:  # a deterministic proposal is a point mass: d is kept w.p. p_target(d)
                p_draft = F.one_hot(drafts, p_target.size(1)).to(p_target.dtype)
            n_accepted, next_token = speculative_verify(drafts, p_draft, p_target, sampling.generator)
            path = list(range(n_accepted))

        # 4. Commit and crop: x_s and the accepted drafts stay in the cache (a tree's accepted path
        #    is moved next to x_s, its other branches dropped); next_token is pending.
        n_accepted = len(path)
        cache.keep(s + 1, [s + 1 + node for node in path])
        drafter.rollback(s + 1 + n_accepted)
        done = committed.add(drafts[path].tolist() + [next_token])
        pending = next_token

        stats.record_cycle(drafted=n, accepted=n_accepted, passes=draft_passes + 1)
        if on_cycle is not None:
            on_cycle({"pending": int(block[0, 0]), "drafts": drafts.tolist(), "accepted": n_accepted, "next": next_token,
                      "parents": parents, "path": path})
    sync_device(cache.k.device)
    stats.decode_seconds = time.perf_counter() - t0
    return committed.tokens, stats


def generate_orthrus(base: GPT, head: DiffusionHead, prompt: list, max_new_tokens: int, draft_len: int = DRAFT_LEN,
                     denoise_steps: int = 1, **kwargs):
    """Orthrus decoding: `generate_speculative` with the diffusion view as the drafter."""
    return generate_speculative(base, DiffusionDrafter(base, head, draft_len, denoise_steps), prompt,
                                max_new_tokens, **kwargs)


def prefill(base: GPT, prompt: list, limit: int, sampling: Sampling, use_cache: bool = True):
    """The AR view over the prompt: a new cache holding [0, s), sized for the prompt plus `limit`
    positions (the new tokens, and for a token tree the nodes its verify block may hold beyond
    them), and the first new token, committed but pending. Returns (cache or None, pending token, seconds)."""
    device = base.lm_head.weight.device
    t0 = time.perf_counter()
    cache = base.new_cache(capacity=len(prompt) + limit) if use_cache else None
    logits = base(torch.tensor([prompt], device=device), cache, logits="last")[0, -1]
    pending = int(sampling.choose(logits))
    sync_device(device)
    return cache, pending, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The diffusion view as a drafter


class DiffusionDrafter:
    """Orthrus' drafter: ONE pass of the diffusion view over [x_s, MASK x (K-1)] drafts K-1 tokens.
    It reads the AR view's cache and writes nothing, so it keeps no state of its own."""

    name = "orthrus"

    def __init__(self, base: GPT, head: DiffusionHead, draft_len: int = DRAFT_LEN, denoise_steps: int = 1):
        check_draft_lens([draft_len])
        if denoise_steps < 1:
            raise UserError(f"denoise steps must be >= 1, got {denoise_steps}")
        self.base, self.head = base, head
        self.max_drafts, self.denoise_steps = draft_len - 1, denoise_steps

    @torch.no_grad()
    def propose(self, cache, sequence: list, n: int, sampling: Sampling) -> Proposal:
        block = torch.full((1, n + 1), self.head.mask_id, dtype=torch.long, device=cache.k.device)
        block[0, 0] = sequence[-1]  # [x_s, MASK x n] at positions s..s+n
        if self.denoise_steps > 1:
            return self._denoise_in_several_steps(cache, block, sampling)
        logits = self.head.draft_logits(self.base, cache, block)[0, :n]  # row j drafts block index j+1
        if sampling.is_greedy:
            return Proposal(greedy(logits), None, 1)
        p_draft = sampling.probs(logits)
        return Proposal(sampling.draw(p_draft), p_draft, 1)

    def _denoise_in_several_steps(self, cache, block, sampling: Sampling) -> Proposal:
        """The paper's multi-step ablation: each pass fixes ceil(remaining / steps_left) still-masked
        positions, which the next pass sees as ordinary tokens. Greedy: the ones the head is most
        confident about. Sampling: the leftmost ones, because speculative sampling is exact only if
        each draft's distribution depends on earlier drafts alone (a draft fixed after a later one
        would depend on it, and its p_draft row would no longer be its law given the accepted
        prefix). A token's p_draft row is the distribution it was drawn from, in its pass."""
        n = block.size(1) - 1
        drafts = torch.zeros(n, dtype=torch.long, device=block.device)
        p_draft = None
        still_masked = torch.ones(n, dtype=torch.bool, device=block.device)  # over block indices 1..n
        passes = 0
        while bool(still_masked.any()):
            logits = self.head.draft_logits(self.base, cache, block)[0, :n]
            passes += 1
            probs = None if sampling.is_greedy else sampling.probs(logits)
            tokens = greedy(logits) if probs is None else sampling.draw(probs)
            steps_left = self.denoise_steps - passes + 1
            if steps_left == 1:
                chosen = still_masked.clone()
            else:  # greedy: most confident first; sampling: left to right (see above)
                confidence = torch.softmax(logits, -1).max(-1).values if probs is None else \
                    -torch.arange(n, dtype=logits.dtype, device=logits.device)
                confidence = confidence.masked_fill(~still_masked, -float("inf"))
                chosen = torch.zeros_like(still_masked)
                chosen[confidence.topk(math.ceil(int(still_masked.sum()) / steps_left)).indices] = True
                chosen &= still_masked
            drafts = torch.where(chosen, tokens, drafts)
            if probs is not None:
                p_draft = probs if p_draft is None else torch.where(chosen[:, None], probs, p_draft)
            block[0, 1:] = torch.where(chosen, tokens, block[0, 1:])
            still_masked &= ~chosen
        return Proposal(drafts, p_draft, passes)

    def start(self, prompt: list, capacity: int) -> None:
        pass  # nothing to reset: the draft pass writes nothing

    def rollback(self, n_valid: int) -> None:
        pass

    def extra_params(self) -> int:
        return sum(p.numel() for p in self.head.parameters())

    def persistent_bytes(self, context_positions: int) -> int:
        return 0  # it reads the AR view's cache in place

    def transient_bytes(self) -> int:
        """K/V of one draft block (all layers), alive only while the draft pass runs; it does not
        grow with the context."""
        return kv_bytes(self.base.config, self.max_drafts + 1, self.base.lm_head.weight.dtype)


# ---------------------------------------------------------------------------------------------
# Plain autoregressive decoding (the baseline and the reference)


@torch.no_grad()
def generate(base: GPT, prompt: list, max_new_tokens: int, sampling: Sampling = GREEDY, eos_ids=(),
             on_tokens=None, use_cache: bool = True):
    """Autoregressive decoding, one token per forward. With use_cache=False every step recomputes
    the whole prefix (the naive baseline the KV cache is measured against).
    Returns (new token ids, DecodeStats); on_tokens(list) streams tokens as they are committed."""
    committed, stats = start_decode(base, prompt, max_new_tokens, eos_ids, on_tokens, "ar" if use_cache else "ar-nocache")
    cache, token, stats.prefill_seconds = prefill(base, prompt, committed.limit, sampling, use_cache)
    t0 = time.perf_counter()
    done = committed.add([token])
    seq = torch.tensor([prompt], device=base.lm_head.weight.device)
    while not done:
        if use_cache:
            logits = base(torch.tensor([[token]], device=seq.device), cache, logits="last")[0, -1]
        else:
            seq = torch.cat([seq, torch.tensor([[token]], device=seq.device)], 1)
            logits = base(seq, logits="last")[0, -1]
        token = int(sampling.choose(logits))
        stats.record_cycle(drafted=0, accepted=0, passes=1)
        done = committed.add([token])
    sync_device(seq.device)
    stats.decode_seconds = time.perf_counter() - t0
    return committed.tokens, stats


@torch.no_grad()
def generate_batch(base: GPT, prompts: list, max_new_tokens: int, sampling: Sampling = GREEDY, stop_ids=(),
                   pad_id: int = 0, compact: bool = True):
    """AR decoding of many prompts (lists of ids, any lengths) together over one KV cache: rows are
    left-padded to the longest prompt (GPT.forward(pad=...) hides the padding) and each stops at its
    first id in stop_ids (kept in its answer) or after max_new_tokens. With compact, finished rows
    leave the batch once a quarter of it has finished. Returns (answers [[id]], stopped [bool])."""
    B, lens = len(prompts), [len(p) for p in prompts]
    if B == 0 or min(lens) == 0:
        raise ValueError("generate_batch needs at least one prompt and no empty prompt")
    device, P = base.lm_head.weight.device, max(lens)
    x = torch.full((B, P), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        x[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([P - n for n in lens], dtype=torch.long, device=device)  # (B,) left padding per row
    cache = base.new_cache(batch_size=B, capacity=P + max_new_tokens)
    logits = base(x.to(device), cache, logits="last", pad=pad)[:, 0]  # (B, V)
    stop = {int(s) for s in stop_ids}
    answers, stopped = [[] for _ in range(B)], [False] * B
    rows = list(range(B))  # the prompt each batch row answers
    for step in range(max_new_tokens):
        token = sampling.choose(logits)  # (rows,)
        for b, t in zip(rows, token.tolist()):
            if not stopped[b]:  # what a finished row draws afterwards is dropped
                answers[b].append(t)
                stopped[b] = t in stop
        alive = [j for j, b in enumerate(rows) if not stopped[b]]
        if not alive or step + 1 == max_new_tokens:
            break
        if compact and len(rows) - len(alive) >= max(1, len(rows) // 4):
            keep = torch.tensor(alive, device=device)
            cache.keep_rows(keep)
            pad, token, rows = pad[keep], token[keep], [rows[j] for j in alive]
        logits = base(token.view(-1, 1), cache, logits="last", pad=pad)[:, 0]
    return answers, stopped

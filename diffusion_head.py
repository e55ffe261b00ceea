"""
The diffusion view of Orthrus (arXiv 2605.12825, Sec. 3): a lightweight, trainable second view of
a frozen autoregressive GPT that drafts K-1 tokens in ONE forward pass.

What the head owns (everything else belongs to the base and stays shared and frozen):
  - per layer, its own attention projections q, k, v, o and its own q/k RMSNorms, initialised as
    copies of the base layer's (`model.Attention`);
  - a trainable MASK embedding, initialised from the base's (never trained) MASK row.

The draft pass, read top to bottom in `DiffusionHead.draft_logits`:
  the cache holds the committed prefix [0, s) written by the AR view; the last committed token
  x_s is pending (not in the cache). The block [x_s, MASK x (K-1)] at positions s..s+K-1 runs
  through every layer with the head's projections. Each block token attends to
    (a) the cache's K/V of [0, s): the very tensors the AR view wrote, read in place, and
    (b) all K block tokens bidirectionally (block K/V from the head's projections).
  Nothing is written to the cache. The logits at block index i draft the token at position s+i+1
  (shifted like an AR model), so one pass yields K-1 drafts.

The training path (`block_logits_for_training`) computes the same thing for many anchors s of one
sequence in a single forward: the frozen base runs once over the sequence and its K/V play the
role of the cache; all blocks are stacked along the time axis and an attention mask lets a block
token see base keys at positions < s and its own block, nothing else. The loss is the forward KL
from the AR teacher (its distribution at position s+i) to the draft distribution at block index i.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from errors import UserError
from model import GPT

DRAFT_LEN = 16  # K, the default draft length: the pending token x_s plus K-1 drafts


def check_draft_lens(lens, name: str = "draft length") -> list:
    """Draft lengths K as they come in (flags, files, API calls), checked in this one place:
    integers >= 2, the pending token plus at least one draft. Returns them sorted."""
    for K in lens:
        if isinstance(K, bool) or not isinstance(K, int) or K < 2:
            raise UserError(f"{name} must be >= 2 (the pending token plus at least one draft), got {K!r}")
    return sorted(lens)


class DiffusionHead(nn.Module):
    def __init__(self, base: GPT, mask_id: int, draft_lens=(DRAFT_LEN,)):
        super().__init__()
        if not 0 <= mask_id < base.config.vocab_size:
            raise ValueError(f"mask_id {mask_id} is outside the vocabulary (size {base.config.vocab_size})")
        self.mask_id = mask_id
        self.draft_lens = sorted(int(k) for k in draft_lens)  # the lengths K it was trained for
        # the head's own attention, one per layer, starting as an exact copy of the base's
        self.attn = nn.ModuleList(copy.deepcopy(layer.self_attn) for layer in base.layers)
        self.mask_embedding = nn.Parameter(base.embed_tokens.weight[mask_id].detach().clone())
        for p in self.parameters():
            p.requires_grad_(True)

    def head_config(self) -> dict:
        return {"mask_id": self.mask_id, "trained_draft_lens": list(self.draft_lens)}  # the stored format

    @property
    def max_draft_len(self) -> int:
        return max(self.draft_lens)

    def embed_block(self, base: GPT, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, T, n_embd) where every MASK id uses the head's MASK embedding."""
        x = base.embed_tokens(tokens)
        is_mask = (tokens == self.mask_id).unsqueeze(-1)
        return torch.where(is_mask, self.mask_embedding.to(x.dtype), x)

    # -----------------------------------------------------------------------------------------
    # Inference: one draft pass over the shared cache

    def draft_logits(self, base: GPT, cache, block: torch.Tensor) -> torch.Tensor:
        """block: (B, K) = [x_s, MASK, ..., MASK] (or partly unmasked, for multi-step denoising) at
        positions s..s+K-1 with s = cache.length. Returns logits (B, K, vocab); index i drafts
        position s+i+1. Reads the cache in place; writes nothing to it."""
        B, K = block.shape
        s = cache.length
        x = self.embed_block(base, block)  # (B, K, n_embd)
        cos, sin = base.rope_cos[s : s + K], base.rope_sin[s : s + K]  # (K, D)
        for i, layer in enumerate(base.layers):
            attn = self.attn[i]
            q, k, v = attn.project(layer.input_layernorm(x), cos, sin)  # q (B,H,K,D), k/v (B,Hkv,K,D)
            k_prefix, v_prefix = cache.committed(i)  # (B, Hkv, s, D): views of what the AR view wrote
            y = prefix_and_block_attention(q, k_prefix, v_prefix, k, v)  # (B, H, K, D)
            x = x + attn.o_proj(y.transpose(1, 2).reshape(B, K, -1))
            x = layer.feed_forward(x)  # shared, frozen MLP half of the block
        return base.lm_head(base.norm(x))

    # -----------------------------------------------------------------------------------------
    # Training: many anchor blocks of one sequence in one masked forward

    def block_logits_for_training(self, base: GPT, idx: torch.Tensor, base_k: list, base_v: list,
                                  anchors: torch.Tensor, draft_len: int, mask_first=None) -> torch.Tensor:
        """idx: (B, T) a training sequence; base_k/base_v: per layer (B, Hkv, T, D), the frozen
        base's keys/values over idx (what its KV cache would hold); anchors: (N,) positions s in
        `valid_anchor_range` (each whole block lies inside the sequence). Returns draft logits (B, N, K, vocab)
        equal to N separate `draft_logits` calls with the cache holding idx[:, :s] (and, for the
        blocks flagged in mask_first, the block [MASK x K])."""
        return base.lm_head(base.norm(self.block_hidden_for_training(base, idx, base_k, base_v, anchors, draft_len,
                                                                     mask_first=mask_first)))

    def forward(self, *args, **kwargs):
        """Training: block_hidden_for_training (a forward, so DistributedDataParallel can wrap the head)."""
        return self.block_hidden_for_training(*args, **kwargs)

    def block_hidden_for_training(self, base: GPT, idx: torch.Tensor, base_k: list, base_v: list,
                                  anchors: torch.Tensor, draft_len: int, checkpoint_layers: bool = False,
                                  blocks_per_call: int = 0, mask_first=None):
        """The last hidden states (B, N, K, n_embd) of block_logits_for_training, before the final
        norm and LM head (chunked_head_loss applies those chunk by chunk). checkpoint_layers: keep
        only each layer's input for backward and recompute the rest (less memory, ~1/3 more time).
        blocks_per_call: how many blocks share one attention call (0: default_blocks_per_call; see
        chunked_block_attention). mask_first: optional (N,) bool, blocks that open with MASK instead of
        x_s: the layout of a draft block prepared before x_s is known (one forward per cycle), whose
        targets are unchanged (index i still drafts s+i+1)."""
        B, T = idx.shape
        K, N = draft_len, anchors.numel()
        offsets = torch.arange(K, device=idx.device)
        positions = (anchors[:, None] + offsets[None, :]).reshape(N * K)  # absolute position of each block token
        block = torch.full((B, N, K), self.mask_id, dtype=idx.dtype, device=idx.device)
        block[:, :, 0] = idx[:, anchors]  # the pending token x_s opens each block
        if mask_first is not None:
            block[:, mask_first.to(idx.device), 0] = self.mask_id  # ... or is not known yet
        x = self.embed_block(base, block.view(B, N * K))  # (B, N*K, n_embd)
        cos, sin = base.rope_cos[positions], base.rope_sin[positions]  # (N*K, D)
        calls = attention_calls(anchors, T, K, blocks_per_call or default_blocks_per_call(T, K))

        def run_layer(x, i):
            attn, layer = self.attn[i], base.layers[i]
            q, k, v = attn.project(layer.input_layernorm(x), cos, sin)  # (B, H or Hkv, N*K, D)
            y = chunked_block_attention(q, base_k[i], base_v[i], k, v, calls)  # (B, H, N*K, D)
            x = x + attn.o_proj(y.transpose(1, 2).reshape(B, N * K, -1))
            return layer.feed_forward(x)

        for i in range(len(base.layers)):
            x = checkpoint(run_layer, x, i, use_reentrant=False) if checkpoint_layers else run_layer(x, i)
        return x.view(B, N, K, -1)


def prefix_and_block_attention(q, k_prefix, v_prefix, k_block, v_block):
    """Softmax attention of block queries over two key sets without concatenating (copying) them:
    the committed prefix (causally before every block token, so fully visible) and the block
    itself (bidirectional). GQA: query head h uses key/value head h // (n_head / n_kv_head).

    q: (B, H, K, D); k_prefix, v_prefix: (B, Hkv, s, D); k_block, v_block: (B, Hkv, K, D).
    Returns (B, H, K, D)."""
    B, H, K, D = q.shape
    Hkv, s = k_prefix.size(1), k_prefix.size(2)
    qg = q.reshape(B, Hkv, (H // Hkv) * K, D)  # group the query heads that share a kv head
    scores = torch.cat([qg @ k_prefix.transpose(-1, -2), qg @ k_block.transpose(-1, -2)], dim=-1) * D**-0.5
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    y = probs[..., :s] @ v_prefix + probs[..., s:] @ v_block  # (B, Hkv, G*K, D)
    return y.reshape(B, H, K, D)


def default_blocks_per_call(seq_len: int, draft_len: int) -> int:
    """Blocks per training attention call: a group's own block tokens then number ~T/4, small
    beside the prefix every query reads, while the calls per layer stay few (4K N / T)."""
    return max(1, seq_len // (4 * draft_len))


def attention_calls(anchors: torch.Tensor, seq_len: int, draft_len: int, blocks_per_call: int) -> list:
    """Split the N blocks into groups of blocks_per_call consecutive ones, each attended in one call:
    (block tokens in the group, prefix length, mask) with prefix length = the group's largest anchor
    (no query of the group sees a base key at or past it) and mask = training_attention_mask of the
    group over that prefix and the group's own block tokens. Built once per forward (one host sync)."""
    K = draft_len
    starts = anchors.tolist()
    calls = []
    for c in range(0, len(starts), blocks_per_call):
        group = anchors[c : c + blocks_per_call]
        prefix = min(max(starts[c : c + blocks_per_call]), seq_len)
        calls.append((group.numel() * K, prefix, training_attention_mask(group, prefix, K)))
    return calls


def chunked_block_attention(q, k_base, v_base, k_block, v_block, calls: list, expand_kv_heads=None):
    """The training attention of all blocks, a group of blocks per call (attention_calls): each
    group's queries attend over the base keys of its prefix and the group's own block keys, under the
    group's mask. One call over all T + N*K keys would compute (N*K) x (T + N*K) scores of which
    each query may use at most T + K; grouping cuts that to (N*K) x (prefix + group*K), ~6x less
    at the paper's shape (T 2,048, 256 blocks of 32), with the same result (masked scores get zero
    weight either way).

    q: (B, H, N*K, D); k_base, v_base: (B, Hkv, T, D); k_block, v_block: (B, Hkv, N*K, D).
    expand_kv_heads: repeat the key/value heads for every query head (None: on CUDA, where PyTorch's
    memory-efficient kernel takes a mask but not grouped key/value heads). Returns (B, H, N*K, D)."""
    sizes = [size for size, _, _ in calls]
    # split, not slicing: the backward of split is one cat, while every slice's backward would
    # zero-fill a gradient the size of the whole q/k/v and add them up
    q_groups, k_groups, v_groups = q.split(sizes, 2), k_block.split(sizes, 2), v_block.split(sizes, 2)
    # the frozen cache is float32; under autocast cast it once per layer, not once per group
    k_base, v_base = k_base.to(k_block.dtype), v_base.to(v_block.dtype)
    expand = (q.is_cuda if expand_kv_heads is None else expand_kv_heads) and q.size(1) != k_base.size(1)
    out = []
    for (_, prefix, mask), q_g, k_g, v_g in zip(calls, q_groups, k_groups, v_groups):
        keys = torch.cat([k_base[:, :, :prefix], k_g], dim=2)
        values = torch.cat([v_base[:, :, :prefix], v_g], dim=2)
        if expand:
            keys = keys.repeat_interleave(q.size(1) // k_base.size(1), dim=1)
            values = values.repeat_interleave(q.size(1) // k_base.size(1), dim=1)
        out.append(F.scaled_dot_product_attention(q_g, keys, values, attn_mask=mask, enable_gqa=not expand))
    return torch.cat(out, dim=2)


def training_attention_mask(anchors: torch.Tensor, seq_len: int, draft_len: int) -> torch.Tensor:
    """Boolean (N*K, T + N*K), True = may attend. Block j (anchor s_j) sees base keys at positions
    < s_j (the committed prefix; x_s itself is in the block, not in the cache) and all K tokens of
    its own block; nothing of the other blocks."""
    N, K = anchors.numel(), draft_len
    device = anchors.device
    block_of_query = torch.arange(N, device=device).repeat_interleave(K)  # (N*K,)
    sees_base = torch.arange(seq_len, device=device)[None, :] < anchors[block_of_query][:, None]  # (N*K, T)
    sees_block = block_of_query[:, None] == block_of_query[None, :]  # (N*K, N*K)
    return torch.cat([sees_base, sees_block], dim=1)


def valid_anchor_range(seq_len: int, draft_len: int) -> tuple[int, int]:
    """Anchors s (inclusive range) whose whole block fits a sequence of T = seq_len tokens.
    Block index i drafts position s+i+1 and is taught by the base output at position s+i (KL) or
    by the data token at s+i+1 (CE), for i = 0..K-2, so s+K-1 <= T-1: s <= T-K. (KL alone would
    allow s = T-K+1; one range for both losses keeps the KL-vs-CE ablation on identical anchors.)"""
    return 0, seq_len - draft_len


def choose_anchors(seq_len: int, draft_len: int, placement: str, generator: torch.Generator,
                   n_random: int = 0, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """'aligned': s = 0, K, 2K, ... (non-overlapping blocks tiling the sequence);
    'random': n_random distinct positions drawn uniformly from the valid range (default 2T/K).
    allowed: optional (hi + 1,) bool, the anchors worth training (response_anchors): only those
    are chosen (the number of random anchors stays 2T/K at most)."""
    lo, hi = valid_anchor_range(seq_len, draft_len)
    if hi < lo:
        raise ValueError(f"draft length {draft_len} does not fit a training sequence of {seq_len} tokens")
    candidates = torch.arange(lo, hi + 1) if allowed is None else allowed[lo : hi + 1].nonzero().view(-1).cpu() + lo
    if placement == "aligned":
        return candidates[candidates % draft_len == lo % draft_len]
    if placement == "random":
        n = min(n_random or max(1, 2 * seq_len // draft_len), candidates.numel())
        return candidates[torch.randperm(candidates.numel(), generator=generator)[:n]].sort().values
    raise ValueError(f"unknown anchor placement {placement!r}: use 'aligned' or 'random'")


def response_anchors(response: torch.Tensor, draft_len: int) -> torch.Tensor:
    """response: (B, T) bool, True where the token is the base's own answer (self-distilled chat
    data). Returns (B, T-K+1) bool: anchor s is worth training in a row iff every target of its
    block, positions s+1..s+K-1, is a response token (the paper trains on the answers only)."""
    B, T = response.shape
    K = draft_len
    inside = torch.cat([response.new_zeros(B, 1, dtype=torch.long), response.long().cumsum(1)], 1)  # (B, T+1)
    s = torch.arange(T - K + 1, device=response.device)
    return (inside[:, s + K] - inside[:, s + 1]) == K - 1


def block_index_weights(draft_len: int, position_decay: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """(K-1,) loss weights of block indices 0..K-2: all 1 (the paper: a uniform average), or
    exp(-i / position_decay) rescaled to mean 1, which puts the effort on the first drafts, the ones
    every accepted run needs (an option for ablations, not in the paper)."""
    i = torch.arange(draft_len - 1, device=device, dtype=dtype)
    if position_decay <= 0:
        return torch.ones_like(i)
    w = torch.exp(-i / position_decay)
    return w * (draft_len - 1) / w.sum()


def head_loss(draft_logits: torch.Tensor, teacher_logp: torch.Tensor, idx: torch.Tensor,
              anchors: torch.Tensor, kind: str = "kl", weight: torch.Tensor | None = None,
              position_decay: float = 0.0):
    """draft_logits: (B, N, K, V). Only block indices 0..K-2 draft (index i -> position s+i+1).
    teacher_logp: (B, T, V) the base's log-probabilities at every position, computed once and
    shared by every block that targets a position.
    'kl': forward KL(teacher || draft), teacher = base distribution at position s+i (the paper's
    objective); 'ce': cross-entropy against the data token at s+i+1 (the ablation).
    weight: optional (B, N) 0/1, which (row, block) pairs count (response_anchors).
    position_decay: weights of the block indices (block_index_weights; 0 = uniform).
    Returns (loss, agreement) with agreement (N, K-1): draft argmax == teacher argmax, averaged
    over the counted rows (the quantity that predicts the accepted length under greedy decoding)."""
    B, N, K, V = draft_logits.shape
    target_pos = anchors[:, None] + torch.arange(K - 1, device=anchors.device)[None, :]  # (N, K-1): position s+i
    wide = torch.promote_types(draft_logits.dtype, torch.float32)  # float32, or float64 when given it
    student = draft_logits[:, :, : K - 1].to(wide)  # (B, N, K-1, V)
    teacher = teacher_logp[:, target_pos]  # (B, N, K-1, V): gathered, not recomputed
    if kind == "kl":
        log_p_teacher = teacher.to(wide)
        log_p_student = F.log_softmax(student, dim=-1)
        per_token = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (B, N, K-1)
    elif kind == "ce":
        labels = idx[:, target_pos + 1]  # (B, N, K-1): the data token at s+i+1
        per_token = F.cross_entropy(student.reshape(-1, V), labels.reshape(-1), reduction="none").view(B, N, K - 1)
    else:
        raise ValueError(f"unknown head loss {kind!r}: use 'kl' or 'ce'")
    w = per_token.new_ones(B, N) if weight is None else weight.to(per_token.dtype)  # (B, N)
    if position_decay > 0:
        per_token = per_token * block_index_weights(K, position_decay, per_token.device, per_token.dtype)
    loss = (per_token * w[..., None]).sum() / ((K - 1) * w.sum()).clamp(min=1)
    agreement = ((student.argmax(-1) == teacher.argmax(-1)).float() * w[..., None]).sum(0) / w.sum(0).clamp(min=1)[:, None]
    return loss, agreement  # agreement (N, K-1)


def chunked_head_loss(base: GPT, hidden: torch.Tensor, teacher_logp: torch.Tensor, idx: torch.Tensor,
                      anchors: torch.Tensor, kind: str = "kl", weight: torch.Tensor | None = None,
                      max_logits: int = 1 << 24, position_decay: float = 0.0):
    """head_loss(lm_head(norm(hidden)), ...) computed a chunk of blocks at a time, each chunk under
    activation checkpointing (its logits are recomputed in backward), so at most ~max_logits
    draft logits (blocks x K x vocab, ~64 MiB in float32 by default) exist at once: what a 49K-152K
    vocabulary needs. hidden: (B, N, K, n_embd). max_logits 0: all blocks at once. Same loss and
    agreement as the unchunked form (a test checks values and gradients in float64)."""
    B, N, K, _ = hidden.shape
    per_chunk = N if max_logits <= 0 else max(1, max_logits // (B * K * base.config.vocab_size))
    logits_of = lambda h: base.lm_head(base.norm(h))  # noqa: E731
    if per_chunk >= N:
        return head_loss(logits_of(hidden), teacher_logp, idx, anchors, kind, weight, position_decay)
    wide = torch.promote_types(hidden.dtype, torch.float32)
    w = torch.ones(B, N, device=hidden.device, dtype=wide) if weight is None else weight.to(wide)
    total, agreement = 0.0, []
    for c in range(0, N, per_chunk):
        part = slice(c, c + per_chunk)

        def chunk_loss(h, part=part):
            return head_loss(logits_of(h), teacher_logp, idx, anchors[part], kind, w[:, part], position_decay)

        loss, agree = checkpoint(chunk_loss, hidden[:, part], use_reentrant=False)
        total = total + loss * w[:, part].sum().clamp(min=1)  # back to a sum over this chunk's blocks
        agreement.append(agree.detach())
    return total / w.sum().clamp(min=1), torch.cat(agreement)


def expected_tokens_per_cycle(agreement_by_index: torch.Tensor) -> float:
    """Tokens committed per draft+verify cycle implied by per-index agreement rates a_i (greedy):
    1 (the bonus) + sum_j prod_{i<=j} a_i, treating the indices as independent. A rough predictor;
    the measured figure comes from actually decoding (bench.py, sample.py --mode compare)."""
    return 1.0 + torch.cumprod(agreement_by_index.double(), 0).sum().item()

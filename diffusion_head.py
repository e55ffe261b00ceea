"""
The diffusion view of Orthrus (arXiv 2605.12825, Sec. 3): a trainable second view of a frozen AR
GPT that drafts K-1 tokens in ONE forward pass. It owns, per layer, attention projections q, k, v,
o and q/k RMSNorms (copies of the base's at first) and a MASK embedding; the rest is the base's.

Draft pass (`draft_logits`): the cache holds the committed prefix [0, s), x_s is pending. The block
[x_s, MASK x (K-1)] at positions s..s+K-1 runs through every layer with the head's projections,
attending to the cache's K/V of [0, s) (read in place, nothing written) and bidirectionally to
itself; the logits at block index i draft position s+i+1.

Training (`block_hidden_for_training`): the same for many anchors s of one sequence in one
forward: the frozen base's K/V over the sequence play the cache, and `training_attention_mask`
lets a block token see base keys before s and its own block only. `head_loss`: the forward KL
from the AR teacher at position s+i to draft index i. training/ makes it scale.
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
    """Draft lengths K as they come in (flags, files, API calls), checked here only; sorted."""
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

    def block_hidden_for_training(self, base: GPT, idx: torch.Tensor, base_k: list, base_v: list,
                                  anchors: torch.Tensor, draft_len: int, mask_first=None, attention=None,
                                  checkpoint_layers: bool = False) -> torch.Tensor:
        """idx (B, T); base_k/base_v: per layer (B, Hkv, T, D), the frozen base's K/V over idx; anchors
        (N,) positions s whose block fits the sequence. Returns the last hidden states (B, N, K, n_embd)
        of N draft passes with the cache holding idx[:, :s]. mask_first: optional (N,) bool, blocks
        opening with MASK instead of x_s (drafted before x_s is known). attention(anchors, T, K) ->
        attend (default one_call_attention; training/attention.py groups blocks). checkpoint_layers:
        recompute each layer's activations in backward."""
        B, T = idx.shape
        K, N = draft_len, anchors.numel()
        positions = (anchors[:, None] + torch.arange(K, device=idx.device)[None, :]).reshape(N * K)  # of each block token
        block = torch.full((B, N, K), self.mask_id, dtype=idx.dtype, device=idx.device)
        block[:, :, 0] = idx[:, anchors]  # the pending token x_s opens each block
        if mask_first is not None:
            block[:, mask_first.to(idx.device), 0] = self.mask_id  # ... or is not known yet
        x = self.embed_block(base, block.view(B, N * K))  # (B, N*K, n_embd)
        cos, sin = base.rope_cos[positions], base.rope_sin[positions]  # (N*K, D)
        attend = (attention or one_call_attention)(anchors, T, K)

        def run_layer(x, i):
            attn, layer = self.attn[i], base.layers[i]
            q, k, v = attn.project(layer.input_layernorm(x), cos, sin)  # (B, H or Hkv, N*K, D)
            y = attend(q, base_k[i], base_v[i], k, v)  # (B, H, N*K, D)
            x = x + attn.o_proj(y.transpose(1, 2).reshape(B, N * K, -1))
            return layer.feed_forward(x)

        for i in range(len(base.layers)):
            x = checkpoint(run_layer, x, i, use_reentrant=False) if checkpoint_layers else run_layer(x, i)
        return x.view(B, N, K, -1)

    forward = block_hidden_for_training  # a forward, so DistributedDataParallel can wrap the head

    def block_logits_for_training(self, base: GPT, *args, **kwargs) -> torch.Tensor:
        """Draft logits (B, N, K, vocab) of block_hidden_for_training."""
        return base.lm_head(base.norm(self.block_hidden_for_training(base, *args, **kwargs)))


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


def one_call_attention(anchors: torch.Tensor, seq_len: int, draft_len: int):
    """The reference training attention: every block query in one call over the T base keys and all
    N*K block keys, under training_attention_mask. Returns attend(q, k_base, v_base, k_block, v_block):
    q (B, H, N*K, D), base keys/values (B, Hkv, T, D), block ones (B, Hkv, N*K, D) -> (B, H, N*K, D)."""
    mask = training_attention_mask(anchors, seq_len, draft_len)

    def attend(q, k_base, v_base, k_block, v_block):
        keys = torch.cat([k_base.to(k_block.dtype), k_block], dim=2)  # (B, Hkv, T + N*K, D)
        values = torch.cat([v_base.to(v_block.dtype), v_block], dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    return attend


def head_loss(draft_logits: torch.Tensor, teacher_logp: torch.Tensor, idx: torch.Tensor,
              anchors: torch.Tensor, kind: str = "kl", weight: torch.Tensor | None = None,
              index_weight: torch.Tensor | None = None):
    """draft_logits: (B, N, K, V). Only block indices 0..K-2 draft (index i -> position s+i+1).
    teacher_logp: (B, T, V) the base's log-probabilities at every position, computed once and
    shared by every block that targets a position.
    'kl': forward KL(teacher || draft), teacher = base distribution at position s+i (the paper's
    objective); 'ce': cross-entropy against the data token at s+i+1 (the ablation).
    weight: optional (B, N) 0/1, which (row, block) pairs count (response_anchors).
    index_weight: optional (K-1,) weights of the block indices (None: uniform, the paper's average).
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
    if index_weight is not None:
        per_token = per_token * index_weight
    loss = (per_token * w[..., None]).sum() / ((K - 1) * w.sum()).clamp(min=1)
    agreement = ((student.argmax(-1) == teacher.argmax(-1)).float() * w[..., None]).sum(0) / w.sum(0).clamp(min=1)[:, None]
    return loss, agreement  # agreement (N, K-1)

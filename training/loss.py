"""
The head's loss at scale: diffusion_head.head_loss a chunk of blocks at a time (a 49K-152K
vocabulary would not fit whole), optional weights per block index, and the figure evaluation
prints from the per-index agreement.
"""

import torch
from torch.utils.checkpoint import checkpoint

from diffusion_head import head_loss
from model import GPT


def block_index_weights(draft_len: int, position_decay: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """(K-1,) loss weights of block indices 0..K-2: all 1 (the paper: a uniform average), or
    exp(-i / position_decay) rescaled to mean 1, which puts the effort on the first drafts, the ones
    every accepted run needs (an option for ablations, not in the paper)."""
    i = torch.arange(draft_len - 1, device=device, dtype=dtype)
    if position_decay <= 0:
        return torch.ones_like(i)
    w = torch.exp(-i / position_decay)
    return w * (draft_len - 1) / w.sum()


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
    index_weight = block_index_weights(K, position_decay, hidden.device, torch.promote_types(hidden.dtype, torch.float32)) \
        if position_decay > 0 else None
    if per_chunk >= N:
        return head_loss(logits_of(hidden), teacher_logp, idx, anchors, kind, weight, index_weight)
    wide = torch.promote_types(hidden.dtype, torch.float32)
    w = torch.ones(B, N, device=hidden.device, dtype=wide) if weight is None else weight.to(wide)
    total, agreement = 0.0, []
    for c in range(0, N, per_chunk):
        part = slice(c, c + per_chunk)

        def chunk_loss(h, part=part):
            return head_loss(logits_of(h), teacher_logp, idx, anchors[part], kind, w[:, part], index_weight)

        loss, agree = checkpoint(chunk_loss, hidden[:, part], use_reentrant=False)
        total = total + loss * w[:, part].sum().clamp(min=1)  # back to a sum over this chunk's blocks
        agreement.append(agree.detach())
    return total / w.sum().clamp(min=1), torch.cat(agreement)


def expected_tokens_per_cycle(agreement_by_index: torch.Tensor) -> float:
    """Tokens committed per draft+verify cycle implied by per-index agreement rates a_i (greedy):
    1 (the bonus) + sum_j prod_{i<=j} a_i, treating the indices as independent. A rough predictor;
    the measured figure comes from actually decoding (bench.py, sample.py --mode compare)."""
    return 1.0 + torch.cumprod(agreement_by_index.double(), 0).sum().item()

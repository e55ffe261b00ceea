"""
Where head training places its blocks: anchor positions s in a sequence, and, for chat data, only
where every target of a block is the base's own answer.
"""

import torch


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

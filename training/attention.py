"""
The head's training attention at scale: blocks attended a group per call (any grouping equals the
one masked call of diffusion_head.one_call_attention; tests/test_training.py checks it in float64).
"""

import torch
import torch.nn.functional as F

from diffusion_head import training_attention_mask


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


def grouped_attention(blocks_per_call: int = 0, expand_kv_heads=None):
    """The `attention` argument of DiffusionHead.block_hidden_for_training that groups blocks
    (blocks_per_call 0: default_blocks_per_call); the calls are planned once per forward."""

    def plan(anchors, seq_len, draft_len):
        calls = attention_calls(anchors, seq_len, draft_len, blocks_per_call or default_blocks_per_call(seq_len, draft_len))
        return lambda q, k_base, v_base, k_block, v_block: chunked_block_attention(q, k_base, v_base, k_block, v_block,
                                                                                   calls, expand_kv_heads)

    return plan

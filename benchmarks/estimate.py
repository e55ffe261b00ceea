"""
What a head-training run will need, before it starts (`train.py --stage head ... --dry-run`): memory
per process and time per optimizer step, from the base's shapes and the run's configuration, by
counting. Nothing is loaded but the base's config; the speed is either measured here (a matmul of
the run's shape on this device) or given (`--tflops` of another device, at MATMUL_EFFICIENCY of
its peak), so a user can size a GPU run on a laptop.

The counts follow the training path of diffusion_head.py: one frozen base forward over each row
(teacher logits for every position, K/V kept for the head, no gradient); per row N anchor blocks of
K tokens through every layer with the head's attention (trainable: weight and input gradients)
and the shared MLP (frozen: input gradients only); the LM head over the block tokens in chunks
that are recomputed in backward; attention a group of blocks at a time over the group's prefix
and block tokens (training/attention.py, chunked_block_attention).
Estimates, not measurements: they leave out allocator slack and small tensors.
"""

import time

import torch

from decoding import sync_device
from training.attention import default_blocks_per_call
from model import kv_bytes

MATMUL_EFFICIENCY = 0.4  # share of a GPU's peak that training matmuls of this size reach, for --tflops
# On a CPU a whole head step runs at about a third of the bare matmul measured_tflops times (small
# ops, softmaxes and casts weigh more there). Measured on this project's 2-core VM, one thread, bf16,
# SmolLM2-135M head K=16 with grouped attention: 512-token rows, 32 anchors, 3.69 s per step against
# 3.3-3.8 s estimated; 1,024-token rows, 64 anchors, 8.24 s against 7.2-7.3 s.
CPU_STEP_EFFICIENCY = 0.33


def measured_tflops(device: torch.device, dtype: torch.dtype, d: int) -> float:
    """Achieved TFLOP/s of a (4096, d) x (d, 4d) matmul on this device, best of a few."""
    a = torch.randn(4096, d, device=device, dtype=dtype)
    b = torch.randn(d, 4 * d, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        sync_device(device)
        t0 = time.perf_counter()
        a @ b
        sync_device(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * 4096 * d * 4 * d / best / 1e12


def attention_groups(seq_len: int, draft_len: float, anchors: int) -> tuple:
    """(groups, mean keys per block query) of chunked_block_attention with the default group size:
    a query reads its group's prefix, the group's largest anchor (for N sorted uniform anchors in
    [0, T-K], the j-th of them lies at j/(N+1) of that range on average), and the group's own
    block tokens."""
    T, K, N = seq_len, draft_len, anchors
    group = min(N, default_blocks_per_call(T, round(K)))
    sizes = [min(group, N - start) for start in range(0, N, group)]  # blocks per call
    ends = [min(start + group, N) for start in range(0, N, group)]  # the largest anchor's rank
    keys = sum(n * (last / (N + 1) * (T - K) + n * K) for n, last in zip(sizes, ends)) / N
    return len(sizes), keys


def head_run(c, *, rows_per_process: int, processes: int, grad_accum: int, seq_len: int, draft_len: float,
             anchors: int, max_logits: int, grad_checkpoint: bool, compute_bytes: int, flash_attention: bool) -> dict:
    """Bytes and FLOPs of one optimizer step for base config `c` (a GPTConfig)."""
    d, L, V, T, K, N = c.n_embd, c.n_layer, c.vocab_size, seq_len, draft_len, anchors
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    attn = d * q + 2 * d * kv + q * d  # one layer's q, k, v, o
    mlp = 3 * d * c.mlp_hidden
    head_params = L * (attn + (2 * c.head_dim if c.qk_norm else 0)) + d
    base_params = L * (attn + mlp + 2 * d) + V * d * (1 if c.tie_embeddings else 2) + d
    R, M = rows_per_process, rows_per_process * N * K  # rows and block tokens per micro-batch and process
    n_groups, keys = attention_groups(T, K, N)
    mem = {
        "base weights (fp32)": 4 * base_params,
        "head weights, grads, AdamW m and v (fp32)": 16 * head_params,
        "teacher logits + log-probs": R * T * V * (compute_bytes + 4),
        "base K/V kept for the head (its fp32 cache)": kv_bytes(c, R * T, torch.float32),
        "head activations kept for backward": M * (d * (2 if grad_checkpoint else 10) + (0 if grad_checkpoint else 3 * c.mlp_hidden)) * L * compute_bytes,
        # on CUDA the groups' keys are expanded to every query head (the memory-efficient kernel takes no GQA)
        "attention keys/values kept for backward (per group)": 0 if grad_checkpoint else
            R * n_groups * keys * 2 * (q if flash_attention else kv) * L * compute_bytes,
        "attention probabilities kept for backward": 0 if flash_attention or grad_checkpoint else R * c.n_head * N * K * keys * L * compute_bytes,
        "one chunk of draft logits (x3: logits, log-softmax, grad)": 3 * 4 * min(max_logits or M * V, M * V),
    }
    flops_base = 2 * R * T * (L * (attn + mlp) + V * d)
    flops_head = M * L * (6 * attn + 4 * mlp) + 6 * M * V * d + 3 * 4 * R * c.n_head * c.head_dim * N * K * keys * L
    if grad_checkpoint:
        flops_head += M * L * 2 * (attn + mlp)
    per_step = grad_accum * (flops_base + flops_head)
    return {"head_params": head_params, "base_params": base_params, "memory": mem,
            "memory_total": sum(mem.values()), "flops_per_step_per_process": per_step,
            "tokens_per_step": processes * grad_accum * R * T}


def report(est: dict, tflops: float, where: str, gpu_memory_gb: float | None = None) -> str:
    gib = 2**30
    lines = [f"dry run: head {est['head_params'] / 1e6:.1f}M trainable parameters on a "
             f"{est['base_params'] / 1e6:.1f}M base; memory per process (estimate):"]
    lines += [f"  {name:<58} {value / gib:8.2f} GiB" for name, value in est["memory"].items()]
    lines.append(f"  {'total':<58} {est['memory_total'] / gib:8.2f} GiB")
    if gpu_memory_gb:
        fits = est["memory_total"] / gib <= 0.9 * gpu_memory_gb
        lines.append(f"  {'fits a ' + format(gpu_memory_gb, 'g') + ' GB device (90% usable)?':<58} {'yes' if fits else 'NO'}")
    seconds = est["flops_per_step_per_process"] / (tflops * 1e12)
    lines.append(f"time per optimizer step: {est['flops_per_step_per_process'] / 1e12:.2f} TFLOP per process at "
                 f"{tflops:.2f} TFLOP/s ({where}) = {seconds:.2f} s; {est['tokens_per_step'] / seconds:,.0f} "
                 f"training tokens/s in all")
    est["seconds_per_step"] = seconds
    return "\n".join(lines)

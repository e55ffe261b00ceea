"""
The GPU check: one script to run the moment a CUDA machine is lent, with nothing installed beyond
torch (no pytest, no checkpoint download). It proves the decoders exact on the device, then prints
one table of AR against Orthrus (chain, token tree, one forward per cycle), in ~2-5 minutes:

    python benchmarks/gpu_check.py                      # CUDA, bfloat16, a Qwen3-0.6B-shaped model
    python benchmarks/gpu_check.py --device cpu --small # the same code on a CPU in seconds (CI runs it)

1. Exactness on the device (float32, a small random model with a perturbed head, and the shipped
   byte model): greedy chain / tree / fused Orthrus == greedy AR token for token; the tree pass's
   logits == a causal pass over each path; the fused pass's prepared block == a separate draft pass.
2. Speed on a Qwen3-shaped model of random weights in --dtype, with acceptance forced by
   construction: every embedding row is the same vector and every o_proj / down_proj weight is
   zero, so the residual stream never depends on the input and every position, in both views,
   has the same logits (an untied random LM head gives them one clear argmax and distinct
   runners-up). Every draft is accepted while every matrix is still multiplied, so the passes cost
   what they cost on a model of that shape (untied: one extra vocabulary matrix). Tokens per cycle
   is then K (chain, fused) or the tree's depth + 1: the table measures the passes, not a head.
No CUDA graphs: on a GPU a cycle is two or three kernel-launch-bound passes, and graphs would need a
static-shape cache path the reference does not have; the table's "AR step" column shows the
launch-bound floor they would attack.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from checkpoint import load_checkpoint, load_model  # noqa: E402
from diffusion_head import DiffusionHead  # noqa: E402
from model import GPT, GPTConfig, tree_layout  # noqa: E402
from orthrus import DiffusionDrafter, generate, generate_orthrus, generate_speculative  # noqa: E402
from tree_and_fused import FusedDiffusionDrafter, TreeDrafter, verify_and_draft  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN3_06B = dict(vocab_size=151936, context_len=4096, n_layer=28, n_embd=1024, n_head=16, n_kv_head=8, head_dim=128,
                 mlp_hidden=3072, tie_embeddings=True)
SMALL = dict(vocab_size=512, context_len=512, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, mlp_hidden=128)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_pair(config: dict, device, dtype, seed=0, spread=0.05):
    torch.manual_seed(seed)
    base = GPT(GPTConfig(**config)).to(device=device, dtype=dtype).eval().requires_grad_(False)
    head = DiffusionHead(base, config["vocab_size"] - 1).to(device=device, dtype=dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(4.0)  # peaked distributions, so greedy text depends on the prompt
        for p in head.parameters():
            p.add_(spread * torch.randn_like(p))
    return base, head


def check(name, ok, failures):
    print(f"  {'ok  ' if ok else 'FAIL'} {name}", flush=True)
    if not ok:
        failures.append(name)


@torch.no_grad()
def exactness(device, small: bool) -> list:
    failures = []
    print(f"exactness on {device} (float64; the shipped model in float32):", flush=True)
    base, head = random_pair(SMALL, device, torch.float64)  # float64: no near-tie can flip between kernels
    prompt = [5, 17, 3, 99, 42, 7]
    ar, _ = generate(base, prompt, 48)
    check("chain == AR", generate_orthrus(base, head, prompt, 48, draft_len=6)[0] == ar, failures)
    check("tree == AR", generate_speculative(base, TreeDrafter(base, head, 6, 24, 4), prompt, 48)[0] == ar,
          failures)
    check("fused == AR", generate_speculative(base, FusedDiffusionDrafter(base, head, 6), prompt, 48)[0] == ar, failures)

    # the tree pass against a causal pass per path, and the fused pass against separate passes (float64)
    base64, head64 = random_pair(SMALL, device, torch.float64)
    tokens, parents = [11, 12, 13, 14, 15], [-1, 0, 0, 1, -1]
    cache = base64.new_cache(capacity=64)
    base64(torch.tensor([prompt], device=device), cache)
    tree_logits = base64(torch.tensor([[9] + tokens], device=device), cache, tree=tree_layout(parents, device))[0]
    path_ok = True
    for node, row in ((-1, 0), (3, 4), (4, 5)):
        path = []
        while node != -1:
            path.insert(0, tokens[node])
            node = parents[node]
        ref = base64(torch.tensor([prompt + [9] + path], device=device), logits="last")[0, -1]
        path_ok &= bool(torch.allclose(tree_logits[row], ref, rtol=0, atol=1e-9))
    check("tree pass == causal pass per path (float64)", path_ok, failures)
    cache = base64.new_cache(capacity=64)
    base64(torch.tensor([prompt], device=device), cache)
    block = torch.tensor([[9, 21, 22, 23]], device=device)
    _, prepared = verify_and_draft(head64, base64, cache, block, [1], 4)
    prepared = base64.lm_head(prepared)  # normed hidden states -> logits
    separate = base64.new_cache(capacity=64)
    base64(torch.tensor([prompt + [9, 21]], device=device), separate)
    mask_block = torch.full((1, 4), head64.mask_id, device=device)
    check("fused prepared block == separate draft pass (float64)",
          bool(torch.allclose(prepared[0], head64.draft_logits(base64, separate, mask_block)[0], rtol=0, atol=1e-9)),
          failures)

    shipped = os.path.join(ROOT, "checkpoints", "orthrus_stdlib_byte.pt")
    if os.path.exists(shipped):
        sbase, shead = load_model(load_checkpoint(shipped), device)
        p = list(b"def ")
        n = 32 if small else 96
        ar, _ = generate(sbase, p, n)
        check("shipped byte model: chain, tree, fused == AR",
              generate_orthrus(sbase, shead, p, n, draft_len=8)[0] == ar
              and generate_speculative(sbase, TreeDrafter(sbase, shead, 8, 31), p, n)[0] == ar
              and generate_speculative(sbase, FusedDiffusionDrafter(sbase, shead, 8), p, n)[0] == ar, failures)
    return failures


@torch.no_grad()
def speed(device, dtype, config: dict, K: int, tree_nodes: int, n_new: int, repeats: int):
    torch.manual_seed(0)
    base = GPT(GPTConfig(**dict(config, tie_embeddings=False)))
    base.embed_tokens.weight.copy_(base.embed_tokens.weight[0].clone())  # one vector for every token (and MASK)
    for layer in base.layers:  # nothing is written into the residual stream: it stays that vector
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    base.lm_head.weight.mul_(50.0)  # a confident argmax: a token tree grows deep rather than wide
    base = base.to(device=device, dtype=dtype).eval().requires_grad_(False)
    head = DiffusionHead(base, config["vocab_size"] - 1).eval().requires_grad_(False)
    prompt = list(range(1, 129))
    runs = {
        "AR": lambda: generate(base, prompt, n_new),
        f"chain K={K}": lambda: generate_speculative(base, DiffusionDrafter(base, head, K), prompt, n_new),
        f"tree K={K} n={tree_nodes}": lambda: generate_speculative(
            base, TreeDrafter(base, head, K, tree_nodes, 4), prompt, n_new),
        f"fused K={K}": lambda: generate_speculative(base, FusedDiffusionDrafter(base, head, K), prompt, n_new),
    }
    for fn in runs.values():  # warm-up: allocator, kernels
        fn()
    times = {name: [] for name in runs}
    stats = {}
    for _ in range(repeats):  # interleaved
        for name, fn in runs.items():
            sync(device)
            t0 = time.perf_counter()
            _, stats[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    ar = statistics.median(times["AR"])
    print(f"\n| decoder ({dtype_name(dtype)}, {config['n_layer']} layers, d={config['n_embd']}, {n_new} tokens, "
          f"acceptance forced) | tokens/cycle | tokens/forward | ms/token | speed vs AR | spread |")
    print("|---|---|---|---|---|---|")
    for name in runs:
        t = statistics.median(times[name])
        s = stats[name]
        spread = (max(times[name]) - min(times[name])) / min(times[name])
        print(f"| {name} | {s.tokens_per_cycle:.2f} | {s.tokens_per_forward:.2f} | {1000 * t / n_new:.2f} | "
              f"{ar / t:.2f}x | {spread:.0%} |")


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="speed part's dtype")
    p.add_argument("--small", action="store_true", help="a tiny model instead of the Qwen3-0.6B shape (seconds)")
    p.add_argument("--draft-len", type=int, default=16)
    p.add_argument("--tree-nodes", type=int, default=31)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run with --device cpu --small to try the script on a CPU", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    t0 = time.time()
    failures = exactness(device, args.small)
    speed(device, getattr(torch, args.dtype), SMALL if args.small else QWEN3_06B, args.draft_len, args.tree_nodes,
          args.max_new_tokens, args.repeats)
    print(f"\n{'all exactness checks passed' if not failures else 'FAILED: ' + ', '.join(failures)} "
          f"({time.time() - t0:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

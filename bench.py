"""
Benchmarks with printed tables (never timed assertions). Everything compared is measured in the
same run, interleaved, so ratios hold on a noisy machine; absolute numbers depend on the machine.

    python bench.py --suite ar                              # AR decoding: KV cache vs recompute; training tok/s
    python bench.py --suite orthrus --ckpt out/head/ckpt.pt # Orthrus vs AR on held-out val prompts

Definitions used in every table:
  tokens/cycle    committed tokens per draft+verify cycle (the prefill token not counted)
  tokens/forward  committed tokens per decoding forward pass, draft AND verify passes counted
  distinct-8      distinct 8-grams / all 8-grams of the output; low = the text loops (easy to draft)
  ceiling         tokens/cycle x t(1-token AR step) / (t(draft pass) + t(verify pass)), from pass
                  costs measured in this run: the speedup the method can reach here
"""

import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from common import ArgumentParser, UserError, load_checkpoint, load_ckpt_tokenizer, load_model, pick_device, run_cli
from model import GPT, GPTConfig
from orthrus import Orthrus, generate, generate_orthrus, transient_draft_bytes
from tokenizer import load_tokens


def build_parser():
    p = ArgumentParser(__doc__)
    p.add_argument("--suite", default="orthrus", choices=["ar", "orthrus"], help="which benchmark to run")
    p.add_argument("--ckpt", default="", help="checkpoint (orthrus suite: base+head; ar suite: optional, else a fresh CPU-preset model)")
    p.add_argument("--data-dir", default="", help="prepared data whose val split gives the prompts (default: the checkpoint's)")
    p.add_argument("--num-prompts", type=int, default=10, help="held-out val prompts")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per prompt")
    p.add_argument("--draft-lens", default="8,16,32", help="Orthrus draft lengths K to compare")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (median reported)")
    p.add_argument("--loop-threshold", type=float, default=0.5, help="distinct-8 below this counts as looping text")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="inference dtype")
    p.add_argument("--json", default="", help="also write the results here as JSON")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=20, warmup=3):
    """Median seconds of fn() over repeats, after warm-up, synchronised around the timer."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def distinct_ngram_fraction(tokens, n=8):
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def val_prompts(data_dir, meta, n, length):
    """n prompts of `length` tokens from the held-out val split, each starting at a line start,
    spread evenly over the split (deterministic)."""
    val = load_tokens(os.path.join(data_dir, "val.bin"), meta["dtype"])
    newline = 10 if meta["tokenizer"]["kind"] == "byte" else None
    prompts, stride = [], (val.numel() - 2 * length - 400) // n
    for i in range(n):
        start = i * stride
        window = val[start : start + length + 400].long().tolist()
        if meta["eot_id"] in window[: length + 200]:  # stay inside one document
            cut = window.index(meta["eot_id"]) + 1
            start, window = start + cut, window[cut:]
        if newline is not None and newline in window[:200]:
            start += window.index(newline) + 1
        prompts.append(val[start : start + length].long().tolist())
    return prompts


# ---------------------------------------------------------------------------------------------
# Suite "ar": the KV cache against recomputing the prefix, and training throughput


def suite_ar(args, device):
    if args.ckpt:
        base, _ = load_model(load_checkpoint(args.ckpt), device)
    else:
        torch.manual_seed(0)
        base = GPT(GPTConfig(n_layer=6, n_embd=256, n_head=8, n_kv_head=4, head_dim=32, mlp_hidden=768,
                             context_len=512)).to(device).eval()
    cfg = base.config
    results = {"model_params": base.num_params(), "context_len": cfg.context_len}
    prompt = list(range(1, 9))
    n_new = cfg.context_len - len(prompt)
    rows = []
    speeds = {"cache": [], "recompute": []}
    for _ in range(args.repeats):  # interleaved
        for name, use_cache in (("cache", True), ("recompute", False)):
            tokens, stats = generate(base, prompt, n_new, use_cache=use_cache)
            speeds[name].append(stats.new_tokens / stats.decode_seconds)
    cache_tps, recompute_tps = statistics.median(speeds["cache"]), statistics.median(speeds["recompute"])
    rows.append(["KV cache", f"{n_new}", f"{cache_tps:,.1f}", f"{cache_tps / recompute_tps:.1f}x"])
    rows.append(["recompute prefix", f"{n_new}", f"{recompute_tps:,.1f}", "1.0x"])
    results["decode_tokens_per_s"] = {"cache": cache_tps, "recompute": recompute_tps}
    print(f"\n### AR decoding to {cfg.context_len} tokens ({base.num_params() / 1e6:.2f}M params, {device})\n")
    print(markdown_table(["decoder", "new tokens", "tokens/s", "vs recompute"], rows))

    # training throughput: forward + backward of the same model, the CPU preset's batch
    train_model = GPT(cfg).to(device).train()
    idx = torch.randint(0, cfg.vocab_size, (4, cfg.context_len + 1), device=device)

    def step():
        logits = train_model(idx[:, :-1], logits="all")
        F.cross_entropy(logits.reshape(-1, cfg.vocab_size), idx[:, 1:].reshape(-1)).backward()

    t = timed(step, device, repeats=5, warmup=2)
    tps = idx.size(0) * cfg.context_len / t
    results["train_tokens_per_s"] = tps
    print(f"\ntraining forward+backward (batch 4 x {cfg.context_len}, fp32): {tps:,.0f} tokens/s ({t:.2f} s/step)")
    return results


# ---------------------------------------------------------------------------------------------
# Suite "orthrus": tokens per cycle, wall-clock against AR, the ceiling, memory


def pass_costs(model: Orthrus, prompt, K, n_new, device):
    """Seconds of one 1-token AR step, one K-token draft pass and one K-token verify pass at the
    context length reached mid-generation (prompt + n_new/2 tokens)."""
    base = model.base
    length = min(len(prompt) + n_new // 2, base.config.context_len - 1)
    ctx = torch.tensor([(prompt * (1 + length // len(prompt)))[:length]], device=device)
    cache = base.new_cache(extra=K)
    with torch.no_grad():
        base(ctx, cache)
    s = cache.length
    one = torch.tensor([[1]], device=device)
    block = torch.full((1, K), model.head.mask_id, device=device)
    block[0, 0] = 1

    @torch.no_grad()
    def ar_step():
        base(one, cache, logits="last")
        cache.crop(s)

    @torch.no_grad()
    def draft():
        model.head.draft_logits(base, cache, block)

    @torch.no_grad()
    def verify():
        base(block.clamp(max=base.config.vocab_size - 1), cache, logits="all")
        cache.crop(s)

    return timed(ar_step, device), timed(draft, device), timed(verify, device)


def suite_orthrus(args, device):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if not args.ckpt:
        raise UserError("--suite orthrus needs --ckpt PATH of a base+head checkpoint (train.py --stage head)")
    ckpt = load_checkpoint(args.ckpt)
    base, head = load_model(ckpt, device, dtype)
    if head is None:
        raise UserError(f"{args.ckpt} has no diffusion head; train one with `python train.py --stage head`")
    model = Orthrus(base, head)
    tokenizer = load_ckpt_tokenizer(ckpt)
    data_dir = args.data_dir or ckpt["data_dir"]
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    prompts = val_prompts(data_dir, meta, args.num_prompts, args.prompt_len)
    try:
        Ks = sorted({int(k) for k in args.draft_lens.split(",")})
    except ValueError:
        raise UserError(f"--draft-lens must be a comma list of integers, got {args.draft_lens!r}") from None
    if Ks[0] < 2:
        raise UserError(f"draft lengths must be >= 2, got {Ks[0]}")
    n_new = args.max_new_tokens
    n_head = sum(p.numel() for p in head.parameters())
    results = {"machine": f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "prompts": len(prompts), "prompt_len": args.prompt_len, "max_new_tokens": n_new,
               "head_params": n_head, "base_params": base.num_params(),
               "trainable_fraction": n_head / (n_head + base.num_params())}

    # 1. Greedy: outputs, exactness, tokens per cycle, looping (one untimed pass per method)
    ar_out = [generate(base, p, n_new)[0] for p in prompts]
    loops = [distinct_ngram_fraction(o) < args.loop_threshold for o in ar_out]
    greedy = {}
    for K in Ks:
        outs, stats = zip(*[generate_orthrus(model, p, n_new, draft_len=K) for p in prompts])
        greedy[K] = {"identical": sum(o == a for o, a in zip(outs, ar_out)), "stats": stats}

    def per_cycle(stats, which):
        chosen = [s for s, lp in zip(stats, loops) if which == "all" or lp == (which == "loop")]
        committed = sum(sum(s.committed_per_cycle) for s in chosen)
        return committed / max(1, sum(s.cycles for s in chosen)), len(chosen)

    # 2. Wall clock: AR and every K, interleaved repeats, median total decode time over all prompts
    times = {"ar": []} | {K: [] for K in Ks}
    for _ in range(args.repeats):
        for method in times:
            t0 = time.perf_counter()
            for p in prompts:
                if method == "ar":
                    generate(base, p, n_new)
                else:
                    generate_orthrus(model, p, n_new, draft_len=method)
            sync(device)
            times[method].append(time.perf_counter() - t0)
    t_ar = statistics.median(times["ar"])
    total_new = sum(len(o) for o in ar_out)

    # 3. Pass costs -> ceiling
    costs = {K: pass_costs(model, prompts[0], K, n_new, device) for K in Ks}

    rows = []
    results["greedy"] = {}
    for K in Ks:
        tpc_all, _ = per_cycle(greedy[K]["stats"], "all")
        tpc_loop, n_loop = per_cycle(greedy[K]["stats"], "loop")
        tpc_free, n_free = per_cycle(greedy[K]["stats"], "free")
        forwards = sum(s.forward_passes for s in greedy[K]["stats"])
        tpf = sum(sum(s.committed_per_cycle) for s in greedy[K]["stats"]) / max(1, forwards)
        t_k = statistics.median(times[K])
        t_step, t_draft, t_verify = costs[K]
        ceiling = tpc_all * t_step / (t_draft + t_verify)
        speedup = t_ar / t_k
        rows.append([K, f"{tpc_all:.2f}", f"{tpc_free:.2f} ({n_free})", f"{tpc_loop:.2f} ({n_loop})", f"{tpf:.2f}",
                     f"{total_new / t_k:,.0f}", f"{speedup:.2f}x", f"{ceiling:.2f}x",
                     f"{1000 * t_draft:.1f} / {1000 * t_verify:.1f}", f"{greedy[K]['identical']}/{len(prompts)}"])
        results["greedy"][K] = {"tokens_per_cycle": tpc_all, "tokens_per_cycle_nonlooping": tpc_free,
                                "tokens_per_cycle_looping": tpc_loop, "n_looping": n_loop, "tokens_per_forward": tpf,
                                "tokens_per_s": total_new / t_k, "speedup": speedup, "ceiling": ceiling,
                                "t_draft_ms": 1000 * t_draft, "t_verify_ms": 1000 * t_verify,
                                "identical": greedy[K]["identical"]}
    ar_tps = total_new / t_ar
    results["ar"] = {"tokens_per_s": ar_tps, "t_step_ms": 1000 * costs[Ks[0]][0]}
    distinct = statistics.mean(distinct_ngram_fraction(o) for o in ar_out)

    print(f"\n### Greedy, {len(prompts)} held-out val prompts x {n_new} new tokens ({results['machine']})\n")
    print(f"AR with KV cache: {ar_tps:,.0f} tokens/s (1-token step {1000 * costs[Ks[0]][0]:.2f} ms); "
          f"mean distinct-8 of the output {distinct:.2f}; {sum(loops)} of {len(prompts)} outputs loop "
          f"(distinct-8 < {args.loop_threshold})\n")
    print(markdown_table(["K", "tokens/cycle", "non-looping (n)", "looping (n)", "tokens/forward", "tokens/s",
                          "speedup vs AR", "ceiling", "draft / verify ms", "identical to AR"], rows))

    # 4. Sampling: temperature 0.7, top-k 50 (tokens per cycle only; seeded)
    srows = []
    results["sampling"] = {}
    for K in Ks:
        stats = [generate_orthrus(model, p, n_new, draft_len=K, temperature=0.7, top_k=50,
                                  generator=torch.Generator(device=device).manual_seed(i))[1]
                 for i, p in enumerate(prompts)]
        tpc = sum(sum(s.committed_per_cycle) for s in stats) / sum(s.cycles for s in stats)
        srows.append([K, f"{tpc:.2f}", f"{tpc / 2:.2f}"])
        results["sampling"][K] = {"tokens_per_cycle": tpc}
    print("\n### Sampling (temperature 0.7, top-k 50), same prompts\n")
    print(markdown_table(["K", "tokens/cycle", "tokens/forward"], srows))

    print("\n### Memory and parameters\n")
    mrows = [[K, f"{transient_draft_bytes(base.config, K, dtype) / 1024:.1f} KiB", "0 B"] for K in Ks]
    print(f"head: {n_head / 1e6:.2f}M trainable parameters = {100 * results['trainable_fraction']:.1f}% of base+head; "
          f"AR KV cache at the full context: {base.new_cache(extra=0).nbytes() / 2**20:.2f} MiB\n")
    print(markdown_table(["K", "transient K/V of one draft block", "extra persistent memory"], mrows))
    results["tokenizer"] = tokenizer.kind
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    results = suite_ar(args, device) if args.suite == "ar" else suite_orthrus(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    run_cli(main)

"""
Benchmarks with printed tables (never timed assertions). Everything compared is measured in the
same run, interleaved, so ratios hold on a noisy machine; absolute numbers depend on the machine.

    python bench.py --suite ar                    # AR decoding: KV cache vs recompute; training tok/s
    python bench.py --suite compare --ckpt CKPT --draft-ckpt DRAFT
                                                  # AR, Orthrus K=4..32, two-model speculative decoding,
                                                  # prompt lookup: same base, prompts and run
    python bench.py --suite ablations --ckpt CKPT --draft-ckpt DRAFT --heads ce=...,self=...
                                                  # denoising steps, head training variants, prompt
                                                  # length, memory vs context, tokenizers

Definitions used in every table:
  tokens/cycle    committed tokens per cycle = per verify pass of the base model (the prefill
                  token not counted; AR: 1)
  tokens/forward  committed tokens per decoding forward pass of ANY model: Orthrus draft + verify,
                  two-model speculative decoding gamma draft-model steps + verify, prompt lookup
                  verify only
  distinct-8      distinct 8-grams / all 8-grams of the output; low = the text loops (easy to draft)
  ceiling         tokens/cycle x t(1-token AR step) / t(the forward passes of one cycle), from pass
                  costs measured in this run: the speedup the method can reach here
"""

import json
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common import ArgumentParser, UserError, load_checkpoint, load_ckpt_tokenizer, load_model, pick_device, run_cli
from model import GPT, GPTConfig
from orthrus import Orthrus, generate, generate_orthrus, transient_draft_bytes
from speculative import DraftModelDrafter, PromptLookupDrafter, generate_speculative
from tokenizer import load_tokens


def build_parser():
    p = ArgumentParser(__doc__)
    p.add_argument("--suite", default="compare", choices=["ar", "compare", "ablations"], help="which benchmark to run")
    p.add_argument("--ckpt", default="", help="base+head checkpoint (suite ar: optional, else a fresh CPU-preset model)")
    p.add_argument("--draft-ckpt", default="", help="draft model for two-model speculative decoding (train.py --preset draft)")
    p.add_argument("--data-dir", default="", help="prepared data whose val split gives the prompts (default: the checkpoint's)")
    p.add_argument("--num-prompts", type=int, default=10, help="held-out val prompts")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens generated per prompt")
    p.add_argument("--methods", default="ar,orthrus,draft-model,prompt-lookup", help="compare: which methods (AR always runs)")
    p.add_argument("--draft-lens", default="4,8,16,32", help="Orthrus draft lengths K to compare")
    p.add_argument("--gammas", default="4", help="tokens the draft model drafts per cycle")
    p.add_argument("--lookup-gammas", default="8", help="tokens prompt lookup drafts per cycle (at most)")
    p.add_argument("--modes", default="greedy,sampling", help="greedy, sampling (temperature 0.7, top-k 50) or both")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats (median reported)")
    p.add_argument("--loop-threshold", type=float, default=0.5, help="distinct-8 below this counts as looping text")
    p.add_argument("--ablations", default="denoise,heads,prompt-length,memory,tokenizer", help="ablations suite: which")
    p.add_argument("--ablation-k", type=int, default=8, help="ablations: Orthrus draft length K")
    p.add_argument("--heads", default="", help="ablations: label=path,... other heads trained on the same base (KL vs CE, corpus vs self)")
    p.add_argument("--prompt-lens", default="32,128,256,384,448", help="ablations: prompt lengths toward the context limit")
    p.add_argument("--tokenizer-ckpts", default="", help="ablations: label=path,... base+head checkpoints with other tokenizers")
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
# Suite "compare": AR, Orthrus, two-model speculative decoding and prompt lookup on one base

SAMPLING = dict(temperature=0.7, top_k=50)


@dataclass
class Method:
    label: str
    kind: str  # "ar", "orthrus", "draft-model" or "prompt-lookup"
    param: int = 0  # Orthrus' draft length K, or the drafter's gamma
    denoise_steps: int = 1


class Contenders:
    """Everything compared decodes the same base model: AR, Orthrus (base + head), the base with a
    separate draft model, the base with prompt lookup."""

    def __init__(self, base, head, draft_model, tokenizer, device):
        self.base, self.head, self.draft_model = base, head, draft_model
        self.orthrus = Orthrus(base, head)
        self.tokenizer, self.device = tokenizer, device

    def decode(self, m: Method, prompt, n_new, sampling: bool, seed: int = 0):
        kw = dict(SAMPLING, generator=torch.Generator(device=self.device).manual_seed(seed)) if sampling else {}
        if m.kind == "ar":
            return generate(self.base, prompt, n_new, **kw)
        if m.kind == "orthrus":
            return generate_orthrus(self.orthrus, prompt, n_new, draft_len=m.param, denoise_steps=m.denoise_steps, **kw)
        if m.kind == "draft-model":
            drafter = DraftModelDrafter(self.draft_model, m.param, self.base.config)
        else:
            drafter = PromptLookupDrafter(m.param)
        return generate_speculative(self.base, drafter, prompt, n_new, **kw)

    def run(self, methods, prompts, n_new, sampling, repeats):
        """Each method over all prompts, `repeats` times, interleaved (AR, m1, m2, ..., AR, m1, ...)
        after a short warm-up of each. Returns {label: {"outs", "stats" (first repeat), "seconds" (median)}}."""
        for m in methods:
            self.decode(m, prompts[0], 8, sampling)
        runs = {m.label: {"times": []} for m in methods}
        for r in range(repeats):
            for m in methods:
                sync(self.device)
                t0 = time.perf_counter()
                done = [self.decode(m, p, n_new, sampling, seed=i) for i, p in enumerate(prompts)]
                sync(self.device)
                runs[m.label]["times"].append(time.perf_counter() - t0)
                if r == 0:
                    runs[m.label]["outs"], runs[m.label]["stats"] = (list(x) for x in zip(*done))
        for run in runs.values():
            run["seconds"] = statistics.median(run.pop("times"))
        return runs


class PassCosts:
    """Median seconds of single forward passes at the context length reached mid-generation:
    these give each method's ceiling, tokens/cycle x t(AR step) / t(the cycle's passes)."""

    def __init__(self, contenders: Contenders, prompt, n_new):
        self.c = contenders
        base = contenders.base
        length = min(len(prompt) + n_new // 2, base.config.context_len - 1)
        self.context = torch.tensor([(prompt * (1 + length // len(prompt)))[:length]], device=contenders.device)
        self.memo = {}

    def _prefilled(self, model, extra):
        cache = model.new_cache(extra=extra)
        with torch.no_grad():
            model(self.context, cache)
        return cache

    def verify(self, K):
        """One K-token AR pass (K = 1: the AR step)."""
        if ("verify", K) not in self.memo:
            base = self.c.base
            cache, block = self._prefilled(base, K), torch.ones(1, K, dtype=torch.long, device=self.c.device)
            s = cache.length

            @torch.no_grad()
            def fn():
                base(block, cache, logits="all" if K > 1 else "last")
                cache.crop(s)

            self.memo["verify", K] = timed(fn, self.c.device)
        return self.memo["verify", K]

    def orthrus_draft(self, K):
        if ("draft", K) not in self.memo:
            base, head = self.c.base, self.c.head
            cache = self._prefilled(base, K)
            block = torch.full((1, K), head.mask_id, device=self.c.device)
            block[0, 0] = 1
            self.memo["draft", K] = timed(torch.no_grad()(lambda: head.draft_logits(base, cache, block)), self.c.device)
        return self.memo["draft", K]

    def draft_model_step(self):
        if "dstep" not in self.memo:
            model = self.c.draft_model
            cache, one = self._prefilled(model, 1), torch.ones(1, 1, dtype=torch.long, device=self.c.device)
            s = cache.length

            @torch.no_grad()
            def fn():
                model(one, cache, logits="last")
                cache.crop(s)

            self.memo["dstep"] = timed(fn, self.c.device)
        return self.memo["dstep"]

    def cycle(self, m: Method, stats) -> float:
        """Seconds of the forward passes of one cycle of method m."""
        if m.kind == "ar":
            return self.verify(1)
        if m.kind == "orthrus":
            return m.denoise_steps * self.orthrus_draft(m.param) + self.verify(m.param)
        if m.kind == "draft-model":
            return m.param * self.draft_model_step() + self.verify(m.param + 1)
        drafted = sum(sum(s.drafted_per_cycle) for s in stats) / max(1, sum(s.cycles for s in stats))
        return self.verify(1 + round(drafted))  # lookup itself is a string search: not a pass


def committed(stats) -> int:
    return sum(sum(s.committed_per_cycle) for s in stats)


def tokens_per_cycle(stats) -> float:
    return committed(stats) / max(1, sum(s.cycles for s in stats))


def acceptance_summary(stats) -> str:
    """mean accepted drafts per cycle / share of cycles accepting none / share accepting all."""
    acc = [a for s in stats for a in s.accepted_per_cycle]
    drafted = [d for s in stats for d in s.drafted_per_cycle]
    if not acc:
        return "-"
    none = sum(a == 0 for a in acc) / len(acc)
    full = sum(a == d > 0 for a, d in zip(acc, drafted)) / len(acc)
    return f"{statistics.mean(acc):.2f} / {100 * none:.0f}% / {100 * full:.0f}%"


def fmt_bytes(n) -> str:
    return "0 B" if n == 0 else f"{n / 1024:,.1f} KiB" if n < 2**20 else f"{n / 2**20:,.2f} MiB"


def load_contenders(args, device):
    """The checkpoint's base + head, the optional draft model (same tokenizer), the val prompts."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if not args.ckpt:
        raise UserError(f"--suite {args.suite} needs --ckpt PATH of a base+head checkpoint (train.py --stage head)")
    ckpt = load_checkpoint(args.ckpt)
    base, head = load_model(ckpt, device, dtype)
    if head is None:
        raise UserError(f"{args.ckpt} has no diffusion head; train one with `python train.py --stage head`")
    draft_model = None
    if args.draft_ckpt:
        dckpt = load_checkpoint(args.draft_ckpt)
        if dckpt["tokenizer"] != ckpt["tokenizer"]:
            raise UserError(f"the draft model {args.draft_ckpt} uses another tokenizer ({dckpt['tokenizer']['kind']}, "
                            f"vocab {dckpt['tokenizer']['vocab_size']}) than the base ({ckpt['tokenizer']['kind']}, "
                            f"vocab {ckpt['tokenizer']['vocab_size']}): train it on the same --data-dir")
        draft_model, _ = load_model(dckpt, device, dtype)
        try:
            DraftModelDrafter(draft_model, 1, base.config)
        except ValueError as e:
            raise UserError(f"--draft-ckpt {args.draft_ckpt}: {e}") from None
    data_dir = args.data_dir or ckpt["data_dir"]
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise UserError(f"no {meta_path}: the val prompts come from prepared data; pass --data-dir")
    with open(meta_path) as f:
        meta = json.load(f)
    tokenizer = load_ckpt_tokenizer(ckpt)
    if args.prompt_len + args.max_new_tokens > base.config.context_len:
        raise UserError(f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens} exceeds the "
                        f"model's context of {base.config.context_len} tokens; shorten one of them")
    prompts = val_prompts(data_dir, meta, args.num_prompts, args.prompt_len)
    return Contenders(base, head, draft_model, tokenizer, device), ckpt, meta, data_dir, prompts


def int_list(text, flag, minimum):
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UserError(f"{flag} must be a comma list of integers, got {text!r}") from None
    if not values or values[0] < minimum:
        raise UserError(f"{flag} values must be >= {minimum}, got {text!r}")
    return values


def compare_methods(args, contenders):
    Ks = int_list(args.draft_lens, "--draft-lens", 2)
    methods = [Method("AR (KV cache)", "ar")] + [Method(f"Orthrus K={K}", "orthrus", K) for K in Ks]
    if contenders.draft_model is not None:
        methods += [Method(f"draft model gamma={g}", "draft-model", g)
                    for g in int_list(args.gammas, "--gammas", 1)]
    methods += [Method(f"prompt lookup gamma={g}", "prompt-lookup", g)
                for g in int_list(args.lookup_gammas, "--lookup-gammas", 1)]
    unknown = set(args.methods.split(",")) - {"ar", "orthrus", "draft-model", "prompt-lookup"}
    if unknown:
        raise UserError(f"unknown --methods {sorted(unknown)}: choose from ar, orthrus, draft-model, prompt-lookup")
    return [m for m in methods if m.kind == "ar" or m.kind in args.methods.split(",")]


def suite_compare(args, device):
    contenders, ckpt, meta, data_dir, prompts = load_contenders(args, device)
    base, head, tok = contenders.base, contenders.head, contenders.tokenizer
    methods = compare_methods(args, contenders)
    n_new = args.max_new_tokens
    n_head = sum(p.numel() for p in head.parameters())
    results = {"machine": machine(device), "prompts": len(prompts), "prompt_len": args.prompt_len,
               "max_new_tokens": n_new, "base_params": base.num_params(), "head_params": n_head,
               "trainable_fraction": n_head / (n_head + base.num_params()), "tokenizer": tok.kind}
    costs = PassCosts(contenders, prompts[0], n_new)
    end_positions = args.prompt_len + n_new

    def extra(m):
        if m.kind == "orthrus":
            return f"{n_head / 1e6:.2f}M", "0 B", 0
        if m.kind == "draft-model":
            d = DraftModelDrafter(contenders.draft_model, m.param)
            return f"{d.extra_params() / 1e6:.2f}M", fmt_bytes(d.persistent_bytes(end_positions)), d.persistent_bytes(end_positions)
        return "0", "0 B", 0

    for mode in args.modes.split(","):
        if mode not in ("greedy", "sampling"):
            raise UserError(f"unknown --modes entry {mode!r}: use greedy, sampling or both")
        sampling = mode == "sampling"
        runs = contenders.run(methods, prompts, n_new, sampling, args.repeats)
        ar = runs[methods[0].label]
        rows, results[mode] = [], {}
        for m in methods:
            run = runs[m.label]
            stats, outs = run["stats"], run["outs"]
            new = sum(len(o) for o in outs)
            chars = sum(len(tok.decode(o)) for o in outs)
            tpc = tokens_per_cycle(stats)
            forwards = sum(s.forward_passes for s in stats)
            ceiling = tpc * costs.verify(1) / costs.cycle(m, stats)
            speedup = ar["seconds"] / run["seconds"]
            identical = sum(o == a for o, a in zip(outs, ar["outs"])) if not sampling else None
            distinct = statistics.mean(distinct_ngram_fraction(o) for o in outs)
            params, memory, memory_bytes = extra(m)
            rows.append([m.label, f"{tpc:.2f}", f"{committed(stats) / max(1, forwards):.2f}",
                         acceptance_summary(stats) if m.kind != "ar" else "-", f"{new / run['seconds']:,.0f}",
                         f"{chars / run['seconds']:,.0f}", f"{speedup:.2f}x", f"{ceiling:.2f}x", params, memory,
                         f"{distinct:.2f}", f"{identical}/{len(prompts)}" if identical is not None else "n/a"])
            results[mode][m.label] = {
                "kind": m.kind, "param": m.param, "tokens_per_cycle": tpc,
                "tokens_per_forward": committed(stats) / max(1, forwards), "tokens_per_s": new / run["seconds"],
                "chars_per_s": chars / run["seconds"], "speedup": speedup, "ceiling": ceiling,
                "extra_persistent_bytes": memory_bytes, "distinct8": distinct, "identical": identical,
                "cycle_pass_ms": 1000 * costs.cycle(m, stats)}
            if m.kind == "orthrus" and not sampling:
                loops = [distinct_ngram_fraction(a) < args.loop_threshold for a in ar["outs"]]
                for which, keep in (("looping", True), ("nonlooping", False)):
                    chosen = [s for s, lp in zip(stats, loops) if lp == keep]
                    results[mode][m.label][f"tokens_per_cycle_{which}"] = tokens_per_cycle(chosen) if chosen else None
                    results[mode][m.label][f"n_{which}"] = len(chosen)
        title = "Greedy" if not sampling else f"Sampling (temperature {SAMPLING['temperature']}, top-k {SAMPLING['top_k']})"
        print(f"\n### {title}: {len(prompts)} held-out val prompts x {n_new} new tokens ({results['machine']})\n")
        print(markdown_table(["method", "tokens/cycle", "tokens/forward", "accepted mean / none / all", "tokens/s",
                              "chars/s", "speedup vs AR", "ceiling", "extra params", "extra persistent memory",
                              "distinct-8", "identical to AR"], rows))

    # Orthrus in detail (greedy): looping vs non-looping prompts, pass costs, transient memory
    if "greedy" in results:
        drows = []
        for m in methods:
            if m.kind != "orthrus":
                continue
            r = results["greedy"][m.label]
            split = [f"{r[f'tokens_per_cycle_{w}']:.2f} ({r[f'n_{w}']})" if r[f"n_{w}"] else "- (0)"
                     for w in ("nonlooping", "looping")]
            drows.append([m.param, *split, f"{1000 * costs.orthrus_draft(m.param):.2f} / {1000 * costs.verify(m.param):.2f}",
                          fmt_bytes(transient_draft_bytes(base.config, m.param, contenders.base.lm_head.weight.dtype))])
        print(f"\n### Orthrus detail (greedy): AR 1-token step {1000 * costs.verify(1):.2f} ms; head "
              f"{n_head / 1e6:.2f}M parameters = {100 * results['trainable_fraction']:.1f}% of base+head\n")
        print(markdown_table(["K", "tokens/cycle, non-looping (n)", "looping (n)", "draft / verify pass ms",
                              "transient K/V of one draft block"], drows))
        results["t_step_ms"] = 1000 * costs.verify(1)
    print("\ntokens/cycle = committed tokens per verify pass of the base (one per cycle); tokens/forward counts "
          "every forward pass: Orthrus draft + verify, draft model gamma steps of the small model + verify, "
          f"prompt lookup verify only. distinct-8 < {args.loop_threshold} = looping text.")
    return results


def machine(device) -> str:
    return f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------
# Suite "ablations": the paper's ablations at small scale


def labelled_paths(text, flag):
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise UserError(f"{flag} takes label=path pairs separated by commas, got {text!r}")
    return pairs


def suite_ablations(args, device):
    contenders, ckpt, meta, data_dir, prompts = load_contenders(args, device)
    base = contenders.base
    K = args.ablation_k
    which = args.ablations.split(",")
    unknown = set(which) - {"denoise", "heads", "prompt-length", "memory", "tokenizer"}
    if unknown:
        raise UserError(f"unknown --ablations {sorted(unknown)}: choose from denoise, heads, prompt-length, memory, tokenizer")
    results = {"machine": machine(device), "K": K}
    n_new = args.max_new_tokens

    if "denoise" in which:
        methods = [Method("AR (KV cache)", "ar")] + [Method(f"{s} step(s)", "orthrus", K, s) for s in (1, 2, 4)]
        runs = contenders.run(methods, prompts, n_new, False, args.repeats)
        rows, results["denoise"] = [], {}
        for m in methods[1:]:
            stats = runs[m.label]["stats"]
            tpf = committed(stats) / sum(s.forward_passes for s in stats)
            speedup = runs[methods[0].label]["seconds"] / runs[m.label]["seconds"]
            same = sum(o == a for o, a in zip(runs[m.label]["outs"], runs[methods[0].label]["outs"]))
            rows.append([m.denoise_steps, f"{tokens_per_cycle(stats):.2f}", f"{tpf:.2f}", f"{speedup:.2f}x", f"{same}/{len(prompts)}"])
            results["denoise"][m.denoise_steps] = {"tokens_per_cycle": tokens_per_cycle(stats), "tokens_per_forward": tpf,
                                                   "speedup": speedup}
        print(f"\n### Denoising steps per draft (Orthrus K={K}, greedy, {len(prompts)} prompts x {n_new} tokens)\n")
        print(markdown_table(["denoising steps", "tokens/cycle", "tokens/forward (draft passes + verify)",
                              "speedup vs AR", "identical to AR"], rows))

    if "heads" in which and args.heads:
        rows, results["heads"] = [], {}
        Ks = int_list(args.draft_lens, "--draft-lens", 2)
        for label, path in labelled_paths(args.heads, "--heads"):
            hckpt = load_checkpoint(path)
            if hckpt.get("base_sha256") not in (ckpt["base_sha256"], ckpt.get("exported_from_sha256")):
                raise UserError(f"--heads {label}={path} was trained on another base than --ckpt: "
                                "an ablation must compare heads of one base")
            _, other = load_model(hckpt, device, base.lm_head.weight.dtype)
            variant = Contenders(base, other, None, contenders.tokenizer, device)
            row, results["heads"][label] = [label, hckpt["train_config"].get("loss", "?"),
                                            hckpt["train_config"].get("teacher_data", "?"), hckpt.get("step", "?")], {}
            for mode in ("greedy", "sampling"):
                for k in Ks:
                    stats = [variant.decode(Method("", "orthrus", k), p, n_new, mode == "sampling", i)[1]
                             for i, p in enumerate(prompts)]
                    row.append(f"{tokens_per_cycle(stats):.2f}")
                    results["heads"][label][f"{mode}_K{k}"] = tokens_per_cycle(stats)
            rows.append(row)
        print(f"\n### Head training variants: tokens/cycle on the same base and prompts ({n_new} new tokens)\n")
        print(markdown_table(["head", "loss", "teacher data", "steps"] + [f"{mode} K={k}" for mode in ("greedy", "sampling")
                                                                          for k in Ks], rows))

    if "prompt-length" in which:
        rows, results["prompt_length"] = [], {}
        ctx = base.config.context_len
        new = min(64, n_new)
        for length in int_list(args.prompt_lens, "--prompt-lens", 1):
            if length + new > ctx:
                continue
            ps = val_prompts(data_dir, meta, args.num_prompts, length)
            methods = [Method("AR (KV cache)", "ar"), Method(f"Orthrus K={K}", "orthrus", K)]
            runs = contenders.run(methods, ps, new, False, args.repeats)
            ar, orth = runs[methods[0].label], runs[methods[1].label]
            total = sum(len(o) for o in ar["outs"])
            tpc = tokens_per_cycle(orth["stats"])
            rows.append([length, f"{total / ar['seconds']:,.0f}", f"{total / orth['seconds']:,.0f}",
                         f"{ar['seconds'] / orth['seconds']:.2f}x", f"{tpc:.2f}"])
            results["prompt_length"][length] = {"ar_tokens_per_s": total / ar["seconds"],
                                                "orthrus_tokens_per_s": total / orth["seconds"], "tokens_per_cycle": tpc}
        print(f"\n### Prompt length toward the context limit ({ctx}): {new} new tokens, Orthrus K={K}, greedy\n")
        print(markdown_table(["prompt tokens", "AR tokens/s", "Orthrus tokens/s", "speedup", "tokens/cycle"], rows))

    if "memory" in which:
        rows, results["memory"] = [], {}
        dtype = base.lm_head.weight.dtype
        drafter = DraftModelDrafter(contenders.draft_model, 1) if contenders.draft_model is not None else None
        cfg = base.config
        per_pos = cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim * base.lm_head.weight.element_size()
        for n in sorted({64, 128, 256, cfg.context_len // 2, cfg.context_len, 4 * cfg.context_len, 32 * cfg.context_len}):
            draft_bytes = drafter.persistent_bytes(n) if drafter else None
            rows.append([n, fmt_bytes(per_pos * n), "0 B", fmt_bytes(transient_draft_bytes(cfg, K, dtype)),
                         fmt_bytes(draft_bytes) if drafter else "(no --draft-ckpt)"])
            results["memory"][n] = {"base_kv": per_pos * n, "orthrus_transient": transient_draft_bytes(cfg, K, dtype),
                                    "draft_model_kv": draft_bytes}
        print(f"\n### Memory beyond the base model's own KV cache, by context length (bytes of K/V, {dtype}; "
              f"rows past {cfg.context_len} are the same formula at longer contexts)\n")
        print(markdown_table(["context tokens", "base KV cache (both)", "Orthrus extra persistent",
                              f"Orthrus transient (one K={K} block)", "draft model's KV cache (persistent)"], rows))

    if "tokenizer" in which and args.tokenizer_ckpts:
        texts = [contenders.tokenizer.decode(p) for p in prompts]
        # every model generates about as many characters as n_new tokens of the main checkpoint
        chars_wanted = n_new * sum(map(len, texts)) / sum(map(len, prompts))
        rows, results["tokenizer"] = [], {}
        for label, path in labelled_paths(args.tokenizer_ckpts, "--tokenizer-ckpts"):
            tckpt = load_checkpoint(path)
            tbase, thead = load_model(tckpt, device, base.lm_head.weight.dtype)
            if thead is None:
                raise UserError(f"--tokenizer-ckpts {label}={path} has no diffusion head")
            ttok = load_ckpt_tokenizer(tckpt)
            encoded = [ttok.encode(t) for t in texts]
            chars_per_token = sum(map(len, texts)) / sum(map(len, encoded))
            t_new = max(8, round(chars_wanted / chars_per_token))
            variant = Contenders(tbase, thead, None, ttok, device)
            methods = [Method("AR", "ar"), Method("Orthrus", "orthrus", K)]
            runs = variant.run(methods, encoded, t_new, False, args.repeats)
            chars = {m.label: sum(len(ttok.decode(o)) for o in runs[m.label]["outs"]) / runs[m.label]["seconds"] for m in methods}
            tpc = tokens_per_cycle(runs["Orthrus"]["stats"])
            rows.append([label, ttok.kind, ttok.vocab_size, f"{chars_per_token:.2f}", f"{chars['AR']:,.0f}",
                         f"{chars['Orthrus']:,.0f}", f"{chars['Orthrus'] / chars['AR']:.2f}x", f"{tpc:.2f}",
                         f"{tpc * chars_per_token:.2f}"])
            results["tokenizer"][label] = {"chars_per_token": chars_per_token, "ar_chars_per_s": chars["AR"],
                                           "orthrus_chars_per_s": chars["Orthrus"], "tokens_per_cycle": tpc}
        print(f"\n### Tokenizers: characters per second (the fair unit), Orthrus K={K}, greedy, ~{chars_wanted:.0f} chars per prompt\n")
        print(markdown_table(["model", "tokenizer", "vocab", "chars/token (prompts)", "AR chars/s", "Orthrus chars/s",
                              "speedup", "tokens/cycle", "chars/cycle"], rows))
    return results


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    for name in ("num_prompts", "prompt_len", "max_new_tokens", "repeats", "ablation_k"):
        if getattr(args, name) < (2 if name == "ablation_k" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be >= {2 if name == 'ablation_k' else 1}, got {getattr(args, name)}")
    suite = {"ar": suite_ar, "compare": suite_compare, "ablations": suite_ablations}[args.suite]
    results = suite(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    run_cli(main)

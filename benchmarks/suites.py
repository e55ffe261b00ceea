"""
The suites of bench.py (its docstring defines every column): AR decoding (KV cache vs
recompute), Orthrus against two-model speculative decoding and prompt lookup on the same base,
prompts and run, and the ablations. Every compared variant is measured in the same run, interleaved.
"""

import os
import statistics
import string
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.drafters import DraftModelDrafter, PromptLookupDrafter
from cli import int_list, parse_dtype
from checkpoint import load_checkpoint, load_ckpt_tokenizer, load_model, open_model, same_tokenizer
from consensus import acceptance_histogram
from data.prompts import read_prompt_file
from decoding import prepack_bf16_linears, sync_device
from diffusion_head import check_draft_lens
from errors import UserError
from model import GPT, GPTConfig, kv_bytes
from orthrus import DiffusionDrafter, generate, generate_speculative
from pretrained import chat_prompt, is_pretrained_path
from sampling import GREEDY, Sampling
from tokenizer import load_tokens
from tree_and_fused import FusedDiffusionDrafter, TreeDrafter, verify_and_draft
from training.data import read_data_meta

SPREAD_WARNING = 0.25  # repeats whose slowest is >25% slower than their fastest are not trustworthy


def timed(fn, device, repeats=20, warmup=3):
    """Median seconds of fn() over repeats, after warm-up, synchronised around the timer."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def distinct_ngram_fraction(tokens, n=8):
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def table(columns, records) -> str:
    """A markdown table: one row per record, one cell per (header, format) column; the format
    names record fields ("{tokens_per_cycle:.2f}") and a cell whose fields are None reads n/a."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        cells = []
        for _, fmt in columns:
            fields = [name for _, name, _, _ in string.Formatter().parse(fmt) if name]
            cells.append("n/a" if any(r.get(f) is None for f in fields) else fmt.format(**r))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_bytes(n) -> str:
    return "0 B" if n == 0 else f"{n / 1024:,.1f} KiB" if n < 2**20 else f"{n / 2**20:,.2f} MiB"


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


def machine(device) -> str:
    n = torch.get_num_threads()
    return f"{device}, {n} thread{'s' if n != 1 else ''}, torch {torch.__version__}"


# ---------------------------------------------------------------------------------------------
# Suite "ar": the KV cache against recomputing the prefix, and training throughput


def suite_ar(args, device):
    if args.ckpt:
        base = open_model(args.ckpt, device)[0]
    else:
        torch.manual_seed(0)
        base = GPT(GPTConfig(n_layer=6, n_embd=256, n_head=8, n_kv_head=4, head_dim=32, mlp_hidden=768,
                             context_len=512)).to(device).eval()
    cfg = base.config
    prompt = list(range(1, 9))
    n_new = min(cfg.context_len, 1024) - len(prompt)  # to the context (a real model's 8K-40K: to 1,024)
    n_new = n_new if args.max_new_tokens is None else min(args.max_new_tokens, cfg.context_len - len(prompt))
    train_len = min(cfg.context_len, 1024)
    print(f"suite ar: {n_new} new tokens with and without the KV cache, {args.repeats} repeat(s), then "
          f"forward+backward steps of 4 x {train_len} tokens", flush=True)
    speeds = {"cache": [], "recompute": []}
    for _ in range(args.repeats):  # interleaved
        for name, use_cache in (("cache", True), ("recompute", False)):
            tokens, stats = generate(base, prompt, n_new, use_cache=use_cache)
            speeds[name].append(stats.new_tokens / stats.decode_seconds)
    records = [{"decoder": name, "new_tokens": n_new, "tokens_per_s": statistics.median(v),
                "spread": spread(v)} for name, v in speeds.items()]
    for r in records:
        r["vs_recompute"] = r["tokens_per_s"] / records[1]["tokens_per_s"]
    print(f"\n### AR decoding to {len(prompt) + n_new} tokens ({base.num_params() / 1e6:.2f}M params, {machine(device)})\n")
    print(table([("decoder", "{decoder}"), ("new tokens", "{new_tokens}"), ("tokens/s", "{tokens_per_s:,.1f}"),
                 ("spread of repeats", "{spread:.0%}"), ("vs recompute", "{vs_recompute:.1f}x")], records))
    warn_if_noisy({r["decoder"]: r["spread"] for r in records})
    results = {"model_params": base.num_params(), "context_len": cfg.context_len,
               "decode_tokens_per_s": {r["decoder"]: r["tokens_per_s"] for r in records}}

    # training throughput: forward + backward of the same model, the CPU preset's batch
    train_model = GPT(cfg).to(device).train()
    idx = torch.randint(0, cfg.vocab_size, (4, train_len + 1), device=device)

    def step():
        logits = train_model(idx[:, :-1], logits="all")
        F.cross_entropy(logits.reshape(-1, cfg.vocab_size), idx[:, 1:].reshape(-1)).backward()

    t = timed(step, device, repeats=args.repeats, warmup=min(2, args.repeats))
    results["train_tokens_per_s"] = idx.size(0) * train_len / t
    print(f"\ntraining forward+backward (batch 4 x {train_len}, fp32): "
          f"{results['train_tokens_per_s']:,.0f} tokens/s ({t:.2f} s/step)")
    return results


def spread(times):
    """(slowest - fastest) / fastest over the repeats of one measurement (None for one repeat)."""
    return (max(times) - min(times)) / min(times) if len(times) > 1 else None


def warn_if_noisy(spreads: dict):
    noisy = {label: s for label, s in spreads.items() if s is not None and s > SPREAD_WARNING}
    if noisy:
        worst = max(noisy, key=noisy.get)
        print(f"\nwarning: the repeats disagree (up to {noisy[worst]:.0%} for {worst}): another process is probably "
              f"using the CPU; ratios in this run are not trustworthy. Rerun on an idle machine (and with --threads 1).")


# ---------------------------------------------------------------------------------------------
# Suite "compare": AR, Orthrus, two-model speculative decoding and prompt lookup on one base

SAMPLING = dict(temperature=0.7, top_k=50)


@dataclass
class Method:
    """One decoder of the base: plain AR (no drafter), or the base verifying a drafter's tokens.
    cycle_seconds(costs, stats) is the time of one cycle's forward passes from measured pass
    costs (it gives the ceiling column)."""

    label: str
    make_drafter: Callable | None
    cycle_seconds: Callable
    param: int = 0  # Orthrus' K, or the drafter's gamma (for tables and JSON)
    greedy_only: bool = False  # token trees: sampled decoding would draft a chain, the plain method

    @property
    def kind(self) -> str:
        return "ar" if self.make_drafter is None else self.make_drafter().name

    def decode(self, base, prompt, n_new, sampling, eos_ids=()):
        if self.make_drafter is None:
            return generate(base, prompt, n_new, sampling, eos_ids)
        return generate_speculative(base, self.make_drafter(), prompt, n_new, sampling, eos_ids)


def ar_method() -> Method:
    return Method("AR (KV cache)", None, lambda costs, stats: costs.verify(1))


def orthrus_method(base, head, K, denoise_steps=1, label=None) -> Method:
    return Method(label or f"Orthrus K={K}", lambda: DiffusionDrafter(base, head, K, denoise_steps),
                  lambda costs, stats: denoise_steps * costs.orthrus_draft(head, K) + costs.verify(K), K)


def orthrus_tree_method(base, head, K, nodes, width) -> Method:
    return Method(f"Orthrus tree K={K} n={nodes} w={width}", lambda: TreeDrafter(base, head, K, nodes, width),
                  lambda costs, stats: costs.orthrus_draft(head, K) + costs.verify(nodes + 1), K, greedy_only=True)


def orthrus_fused_method(base, head, K) -> Method:
    def cycle_seconds(costs, stats):  # one fused pass, plus a draft pass whenever the acceptance was not foreseen
        cycles = sum(s.cycles for s in stats)
        separate_drafts = (sum(s.forward_passes for s in stats) - cycles) / max(1, cycles)
        return costs.fused(head, K) + separate_drafts * costs.orthrus_draft(head, K)

    return Method(f"Orthrus fused K={K}", lambda: FusedDiffusionDrafter(base, head, K), cycle_seconds, K)


def draft_model_method(base, draft_model, gamma) -> Method:
    return Method(f"draft model gamma={gamma}", lambda: DraftModelDrafter(draft_model, gamma, base.config),
                  lambda costs, stats: gamma * costs.draft_model_step(draft_model) + costs.verify(gamma + 1), gamma)


def prompt_lookup_method(gamma) -> Method:
    def cycle_seconds(costs, stats):  # the lookup itself is a string search, not a pass
        drafted = sum(sum(s.drafted_per_cycle) for s in stats) / max(1, sum(s.cycles for s in stats))
        return costs.verify(1 + round(drafted))

    return Method(f"prompt lookup gamma={gamma}", lambda: PromptLookupDrafter(gamma), cycle_seconds, gamma)


def run_methods(base, methods, prompts, n_new, sampling: bool, repeats, device, eos_ids=()):
    """Each method over all prompts, `repeats` times, interleaved (m1, m2, ..., m1, m2, ...) after a
    short warm-up of each. Returns {label: {"outs", "stats" (first repeat), "seconds" (median),
    "spread"}}. Sampled runs seed prompt i's generator with i, so every repeat decodes the same.
    eos_ids: stop a continuation at any of them (chat prompts: the end of turn)."""
    def settings(seed):
        return Sampling(**SAMPLING, generator=torch.Generator(device=device).manual_seed(seed)) if sampling else GREEDY

    for m in methods:
        m.decode(base, prompts[0], 8, settings(0))
    runs = {m.label: {"times": []} for m in methods}
    for r in range(repeats):
        for m in methods:
            sync_device(device)
            t0 = time.perf_counter()
            done = [m.decode(base, p, n_new, settings(i), eos_ids) for i, p in enumerate(prompts)]
            sync_device(device)
            runs[m.label]["times"].append(time.perf_counter() - t0)
            if r == 0:
                runs[m.label]["outs"], runs[m.label]["stats"] = (list(x) for x in zip(*done))
    for run in runs.values():
        times = run.pop("times")
        run["seconds"], run["spread"] = statistics.median(times), spread(times)
    return runs


class PassCosts:
    """Median seconds of single forward passes at the context length reached mid-generation:
    these give each method's ceiling, tokens/cycle x t(AR step) / t(the cycle's passes)."""

    def __init__(self, base, prompt, n_new, device):
        self.base, self.device, self.prompt = base, device, prompt
        self.length = len(prompt) + n_new // 2
        self.memo = {}

    def _prefilled(self, model, block_len):
        """A cache holding the context a block of block_len tokens is measured after (kept short
        enough that the block stays inside the model's context)."""
        length = min(self.length, model.config.context_len - block_len)
        context = torch.tensor([(self.prompt * (1 + length // len(self.prompt)))[:length]], device=self.device)
        cache = model.new_cache(capacity=length + block_len)
        with torch.no_grad():
            model(context, cache)
        return cache

    def _memo(self, key, make_fn):
        if key not in self.memo:
            self.memo[key] = timed(make_fn(), self.device)
        return self.memo[key]

    def verify(self, K):
        """One K-token AR pass (K = 1: the AR step)."""
        def make():
            cache, block = self._prefilled(self.base, K), torch.ones(1, K, dtype=torch.long, device=self.device)
            length = cache.length
            return torch.no_grad()(lambda: (self.base(block, cache, logits="all" if K > 1 else "last"), cache.crop(length)))
        return self._memo(("verify", K), make)

    def orthrus_draft(self, head, K):
        def make():
            cache = self._prefilled(self.base, K)
            block = torch.full((1, K), head.mask_id, dtype=torch.long, device=self.device)
            block[0, 0] = 1
            return torch.no_grad()(lambda: head.draft_logits(self.base, cache, block))
        return self._memo(("draft", id(head), K), make)

    def fused(self, head, K, foresee=(0, 1, 2)):
        """One verify pass of K tokens carrying the next draft blocks (FusedDiffusionDrafter)."""
        def make():
            cache, block = self._prefilled(self.base, 2 * K), torch.ones(1, K, dtype=torch.long, device=self.device)
            length, starts = cache.length, sorted(set(foresee) | {K - 1})
            return torch.no_grad()(lambda: (verify_and_draft(head, self.base, cache, block, starts, K), cache.crop(length)))
        return self._memo(("fused", id(head), K), make)

    def draft_model_step(self, model):
        def make():
            cache, one = self._prefilled(model, 1), torch.ones(1, 1, dtype=torch.long, device=self.device)
            length = cache.length
            return torch.no_grad()(lambda: (model(one, cache, logits="last"), cache.crop(length)))
        return self._memo(("dstep", id(model)), make)


def method_record(m: Method, run, ar_run, costs: PassCosts, tokenizer, sampling: bool, end_positions: int) -> dict:
    """Every figure the compare tables show for one method, computed once from its runs."""
    stats, outs = run["stats"], run["outs"]
    cycle_tokens = sum(s.cycle_tokens for s in stats)
    cycles = sum(s.cycles for s in stats)
    accepted = [a for s in stats for a in s.accepted_per_cycle]
    drafted = [d for s in stats for d in s.drafted_per_cycle]
    drafter = m.make_drafter() if m.make_drafter else None
    new = sum(len(o) for o in outs)
    tpc = cycle_tokens / max(1, cycles)
    return {
        "label": m.label, "kind": m.kind, "param": m.param,
        "tokens_per_cycle": tpc, "cycles": cycles, "forward_passes": sum(s.forward_passes for s in stats),
        "tokens_per_forward": cycle_tokens / max(1, sum(s.forward_passes for s in stats)),
        "accepted_mean": statistics.mean(accepted) if drafter and accepted else None,
        "accepted_none": sum(a == 0 for a in accepted) / len(accepted) if drafter and accepted else None,
        # a tree drafts more nodes than any path can accept: "all accepted" is a chain's notion
        "accepted_all": (sum(a == d > 0 for a, d in zip(accepted, drafted)) / len(accepted)
                         if drafter and accepted and not m.greedy_only else None),
        "tokens_per_s": new / run["seconds"],
        "chars_per_s": sum(len(tokenizer.decode(o)) for o in outs) / run["seconds"],
        "speedup": ar_run["seconds"] / run["seconds"],
        "spread": run["spread"],
        "ceiling": tpc * costs.verify(1) / m.cycle_seconds(costs, stats),
        "cycle_pass_ms": 1000 * m.cycle_seconds(costs, stats),
        "cycle_in_steps": m.cycle_seconds(costs, stats) / costs.verify(1),
        "extra_params": drafter.extra_params() if drafter else 0,
        "accepted_histogram": acceptance_histogram(accepted, max(drafted)) if drafter and drafted else None,
        "extra_persistent_bytes": drafter.persistent_bytes(end_positions) if drafter else 0,
        "transient_bytes": drafter.transient_bytes() if drafter else 0,
        "distinct8": statistics.mean(distinct_ngram_fraction(o) for o in outs),
        "identical": None if sampling else sum(o == a for o, a in zip(outs, ar_run["outs"])),
        "prompts": len(outs),
    }


COMPARE_COLUMNS = [
    ("method", "{label}"), ("tokens/cycle", "{tokens_per_cycle:.2f}"), ("tokens/forward", "{tokens_per_forward:.2f}"),
    ("accepted mean / none / all", "{accepted_mean:.2f} / {accepted_none:.0%} / {accepted_all:.0%}"),
    ("tokens/s", "{tokens_per_s:,.0f}"), ("chars/s", "{chars_per_s:,.0f}"),
    ("cycle's passes in AR steps", "{cycle_in_steps:.2f}"),
    ("speedup vs AR", "{speedup:.2f}x"), ("spread", "{spread:.0%}"), ("ceiling", "{ceiling:.2f}x"),
    ("extra params", "{extra_params:,}"), ("extra persistent memory", "{extra_persistent_memory}"),
    ("distinct-8", "{distinct8:.2f}"), ("identical to AR", "{identical}/{prompts}"),
]


class Bench:
    """What every suite decodes with: the model's base + head (any path open_model accepts), the
    optional draft model (same tokenizer), the tokenizer, and the prompts: held-out val windows of
    prepared data, or a prompt file (--prompts; --chat wraps each in the model's chat format and
    stops at its end of turn)."""

    def __init__(self, args, device):
        dtype = parse_dtype(args.dtype)
        if not args.ckpt:
            raise UserError(f"--suite {args.suite} needs --ckpt PATH of a base+head checkpoint (train.py --stage head)")
        prompt_texts = [r["prompt"] for r in read_prompt_file(args.prompts)] if args.prompts else None  # fails before loading
        self.base, self.head, self.tokenizer, self.info = open_model(args.ckpt, device, dtype, base_path=args.base)
        prepack_bf16_linears(self.base, *([self.head] if self.head is not None else []))  # bf16 on a CPU
        self.ckpt = self.info.get("ckpt") or {}
        if self.head is None:
            raise UserError(f"{args.ckpt} has no diffusion head; train one with `python train.py --stage head`")
        self.draft_model = None
        if args.draft_ckpt:
            # compare tokenizers before building the draft model (ours: from the checkpoint's meta)
            if is_pretrained_path(args.draft_ckpt):
                self.draft_model, _, dtok, _ = open_model(args.draft_ckpt, device, dtype)
                prepack_bf16_linears(self.draft_model)
                dmeta = dtok.meta()
            else:
                dckpt = load_checkpoint(args.draft_ckpt)
                dmeta = dckpt["tokenizer"]
            if not same_tokenizer(dmeta, self.tokenizer.meta()):
                raise UserError(f"the draft model {args.draft_ckpt} uses another tokenizer ({dmeta['kind']}, vocab "
                                f"{dmeta['vocab_size']}) than the base ({self.tokenizer.kind}, vocab "
                                f"{self.tokenizer.vocab_size}): train it on the same --data-dir")
            if self.draft_model is None:  # the checkpoint read above, not a second read of the file
                self.draft_model = load_model(dckpt, device, dtype)[0]
                prepack_bf16_linears(self.draft_model)
            DraftModelDrafter(self.draft_model, 1, self.base.config)  # vocabulary and context checks
        self.stop_ids = []  # val windows: every method decodes exactly --max-new-tokens
        if prompt_texts is not None:
            if args.chat:
                self.prompts = [chat_prompt(self.tokenizer, p)[0] for p in prompt_texts[: args.num_prompts]]
                self.stop_ids = [*self.info["stop_ids"], self.tokenizer.end_of_turn_id]
            else:
                self.prompts = [self.tokenizer.encode(p) for p in prompt_texts[: args.num_prompts]]
            if len(self.prompts) < args.num_prompts:
                print(f"note: --num-prompts {args.num_prompts} but the prompt file has {len(self.prompts)}; using them all")
            longest = max(map(len, self.prompts))
            if longest + args.max_new_tokens > self.base.config.context_len:
                raise UserError(f"a prompt of {longest} tokens + --max-new-tokens {args.max_new_tokens} exceeds the "
                                f"model's context of {self.base.config.context_len} tokens; shorten one of them")
            self.data_dir = self.meta = None
        else:
            if args.chat:
                raise UserError("--chat needs --prompts FILE (chat prompts); val windows of prepared data are plain text")
            self.data_dir = args.data_dir or self.info.get("data_dir")
            if not self.data_dir:
                raise UserError("no prompts: pass --prompts FILE (JSONL or text) or --data-dir of prepared data")
            if not args.data_dir and self.ckpt.get("data_kind") == "self-distilled":
                self.data_dir = self_distilled_source(args.ckpt, self.data_dir)
            self.meta = read_data_meta(self.data_dir)
            if args.prompt_len + args.max_new_tokens > self.base.config.context_len:
                raise UserError(f"--prompt-len {args.prompt_len} + --max-new-tokens {args.max_new_tokens} exceeds the "
                                f"model's context of {self.base.config.context_len} tokens; shorten one of them")
            self.prompts = val_prompts(self.data_dir, self.meta, args.num_prompts, args.prompt_len)
        longest = max(map(len, self.prompts))
        room = self.base.config.context_len - longest
        for flag, K in [("--draft-lens", K) for K in draft_lens(args.draft_lens)] + [("--draft-len", args.draft_len)]:
            if K > room:  # as sample.py's --draft-len: a draft block must fit after the prompt
                raise UserError(f"{flag} {K} exceeds the {room} positions left in the context after a {longest}-token "
                                "prompt; use a shorter draft or prompt")
        kinds = args.methods.split(",") if args.suite == "compare" else []
        wider = ([(f"--draft-lens {K} with orthrus-fused", 2 * K, "a verify block and the next draft block")
                  for K in draft_lens(args.draft_lens) if "orthrus-fused" in kinds]
                 + [(f"--tree-nodes {n}", n + 1, "the tree and its root") for n in counts(args.tree_nodes, "--tree-nodes")
                    if "orthrus-tree" in kinds])
        for what, need, why in wider:
            if need > room:
                raise UserError(f"{what} needs {need} positions ({why}), more than the {room} left in the context "
                                f"after a {longest}-token prompt; use a smaller value or a shorter prompt")
        self.device = device


def self_distilled_source(ckpt_path, data_dir):
    """The prepared corpus whose val split gives prompts for a head trained on self-distilled
    data (corpus mode: its source_data_dir). A head trained on answers to prompts has no corpus:
    one line naming the held-out prompts to pass instead."""
    meta = read_data_meta(data_dir) if os.path.isfile(os.path.join(data_dir, "meta.json")) else {}
    if meta.get("source_data_dir"):
        return meta["source_data_dir"]
    chat, prompts = " --chat" if meta.get("chat", True) else "", meta.get("prompts")
    if prompts and os.path.isdir(prompts):  # a data/chat_prompts.py folder
        held_out = os.path.join(prompts, "heldout.jsonl") + chat
    elif prompts:  # a prompt file, split by the same rule chat_prompts.py writes out
        held_out = f"DIR/heldout.jsonl{chat} after `python data/chat_prompts.py --input {prompts} --out-dir DIR`"
    else:
        held_out = f"FILE{chat} (e.g. the heldout.jsonl that data/chat_prompts.py writes)"
    raise UserError(f"{ckpt_path} was trained on the base's answers to prompts (data/self_distill.py --prompts), not "
                    f"on a corpus: benchmark it on held-out prompts, --prompts {held_out}")


def counts(text, flag, minimum=1):
    """A comma list of counts (--gammas, --prompt-lens), each >= minimum."""
    values = int_list(text, flag)
    if values[0] < minimum:
        raise UserError(f"{flag} values must be >= {minimum}, got {text!r}")
    return values


def draft_lens(text, flag="--draft-lens"):
    return check_draft_lens(int_list(text, flag), flag)


def names_list(text, flag, allowed):
    names = [n for n in text.split(",") if n]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
        raise UserError(f"unknown {flag} {unknown}: choose from {', '.join(allowed)}")
    return names


METHODS = ("ar", "orthrus", "orthrus-tree", "orthrus-fused", "draft-model", "prompt-lookup")


def compare_methods(args, bench: Bench):
    kinds = names_list(args.methods, "--methods", METHODS)
    methods = [ar_method()]
    if "orthrus" in kinds:
        methods += [orthrus_method(bench.base, bench.head, K) for K in draft_lens(args.draft_lens)]
    if "orthrus-tree" in kinds:
        methods += [orthrus_tree_method(bench.base, bench.head, K, n, args.tree_width)
                    for K in draft_lens(args.draft_lens) for n in counts(args.tree_nodes, "--tree-nodes")]
    if "orthrus-fused" in kinds:
        methods += [orthrus_fused_method(bench.base, bench.head, K) for K in draft_lens(args.draft_lens)]
    if "draft-model" in kinds and bench.draft_model is not None:
        methods += [draft_model_method(bench.base, bench.draft_model, g) for g in counts(args.gammas, "--gammas")]
    elif "draft-model" in kinds:  # in the default --methods (bench.py refuses it asked for by name)
        print("note: two-model speculative decoding (draft-model) skipped: it needs --draft-ckpt, a small model "
              "(train.py --preset draft)")
    if "prompt-lookup" in kinds:
        methods += [prompt_lookup_method(g) for g in counts(args.lookup_gammas, "--lookup-gammas")]
    return methods


def suite_compare(args, device):
    bench = Bench(args, device)
    base, head, prompts = bench.base, bench.head, bench.prompts
    methods = compare_methods(args, bench)
    modes = names_list(args.modes, "--modes", ("greedy", "sampling"))
    n_new = args.max_new_tokens
    n_head = sum(p.numel() for p in head.parameters())
    results = {"machine": machine(device), "prompts": len(prompts), "prompt_len": args.prompt_len,
               "max_new_tokens": n_new, "base_params": base.num_params(), "head_params": n_head,
               "trainable_fraction": n_head / (n_head + base.num_params()), "tokenizer": bench.tokenizer.kind}
    costs = PassCosts(base, prompts[0], n_new, device)

    every_method = methods
    for mode in modes:
        sampling = mode == "sampling"
        methods = [m for m in every_method if not (sampling and m.greedy_only)]
        runs = run_methods(base, methods, prompts, n_new, sampling, args.repeats, device, bench.stop_ids)
        ar_run = runs[methods[0].label]
        records = [method_record(m, runs[m.label], ar_run, costs, bench.tokenizer, sampling, args.prompt_len + n_new)
                   for m in methods]
        loops = [distinct_ngram_fraction(a) < args.loop_threshold for a in ar_run["outs"]]
        for m, r in zip(methods, records):
            r["extra_persistent_memory"] = fmt_bytes(r["extra_persistent_bytes"])
            if r["kind"] == "orthrus" and not sampling:  # looping vs non-looping prompts, apart
                for which, keep in (("looping", True), ("nonlooping", False)):
                    chosen = [s for s, lp in zip(runs[m.label]["stats"], loops) if lp == keep]
                    r[f"n_{which}"] = len(chosen)
                    r[f"tokens_per_cycle_{which}"] = (sum(s.cycle_tokens for s in chosen) / max(1, sum(s.cycles for s in chosen))
                                                      if chosen else None)
        results[mode] = {r["label"]: r for r in records}
        title = "Greedy" if not sampling else f"Sampling (temperature {SAMPLING['temperature']}, top-k {SAMPLING['top_k']})"
        print(f"\n### {title}: {len(prompts)} held-out prompt{'s' if len(prompts) != 1 else ''} x {n_new} new tokens "
              f"({results['machine']})\n")
        print(table(COMPARE_COLUMNS, records))
        warn_if_noisy({r["label"]: r["spread"] for r in records})

    if "greedy" in results:  # Orthrus in detail: looping vs non-looping prompts, pass costs, transient memory
        detail = [dict(r, draft_ms=1000 * costs.orthrus_draft(head, r["param"]), verify_ms=1000 * costs.verify(r["param"]),
                       transient=fmt_bytes(r["transient_bytes"]))
                  for r in results["greedy"].values() if r["label"].startswith("Orthrus K=")]
        results["t_step_ms"] = 1000 * costs.verify(1)
        print(f"\n### Orthrus detail (greedy): AR 1-token step {results['t_step_ms']:.2f} ms; head "
              f"{n_head / 1e6:.2f}M parameters = {100 * results['trainable_fraction']:.1f}% of base+head\n")
        print(table([("K", "{param}"), ("tokens/cycle, non-looping (n)", "{tokens_per_cycle_nonlooping:.2f} ({n_nonlooping})"),
                     ("looping (n)", "{tokens_per_cycle_looping:.2f} ({n_looping})"),
                     ("draft / verify pass ms", "{draft_ms:.2f} / {verify_ms:.2f}"),
                     ("transient K/V of one draft block", "{transient}"),
                     ("cycles by accepted drafts 0, 1, ..., K-1", "{accepted_histogram}")], detail))
    print("\ntokens/cycle = committed tokens per verify pass of the base (one per cycle); tokens/forward counts "
          "every forward pass: Orthrus draft + verify, draft model gamma steps of the small model + verify, "
          f"prompt lookup verify only. distinct-8 < {args.loop_threshold} = looping text. spread = (slowest - fastest) "
          "/ fastest over the repeats.")
    return results


# ---------------------------------------------------------------------------------------------
# Suite "ablations": the paper's ablations at small scale


def labelled_paths(text, flag):
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
        raise UserError(f"{flag} takes label=path pairs separated by commas, got {text!r}")
    return pairs


def suite_ablations(args, device):
    bench = Bench(args, device)
    base, head, prompts = bench.base, bench.head, bench.prompts
    K, n_new = args.draft_len, args.max_new_tokens
    which = names_list(args.ablations, "--ablations", ("denoise", "heads", "prompt-length", "memory", "tokenizer"))
    results = {"machine": machine(device), "K": K}

    if "denoise" in which:
        methods = [ar_method()] + [orthrus_method(base, head, K, steps, f"{steps} step(s)") for steps in (1, 2, 4)]
        runs = run_methods(base, methods, prompts, n_new, False, args.repeats, device, bench.stop_ids)
        ar_run = runs[methods[0].label]
        records = []
        for steps, m in zip((1, 2, 4), methods[1:]):
            stats = runs[m.label]["stats"]
            records.append({"steps": steps, "tokens_per_cycle": sum(s.cycle_tokens for s in stats) / sum(s.cycles for s in stats),
                            "tokens_per_forward": sum(s.cycle_tokens for s in stats) / sum(s.forward_passes for s in stats),
                            "speedup": ar_run["seconds"] / runs[m.label]["seconds"], "spread": runs[m.label]["spread"],
                            "identical": sum(o == a for o, a in zip(runs[m.label]["outs"], ar_run["outs"])),
                            "prompts": len(prompts)})
        results["denoise"] = {r["steps"]: r for r in records}
        print(f"\n### Denoising steps per draft (Orthrus K={K}, greedy, {len(prompts)} prompts x {n_new} tokens)\n")
        print(table([("denoising steps", "{steps}"), ("tokens/cycle", "{tokens_per_cycle:.2f}"),
                     ("tokens/forward (draft passes + verify)", "{tokens_per_forward:.2f}"),
                     ("speedup vs AR", "{speedup:.2f}x"), ("spread", "{spread:.0%}"),
                     ("identical to AR", "{identical}/{prompts}")], records))

    if "heads" in which and args.heads:
        Ks = draft_lens(args.draft_lens)
        records = []
        for label, path in labelled_paths(args.heads, "--heads"):
            hckpt = load_checkpoint(path)
            if hckpt.get("base_sha256") not in (bench.ckpt.get("base_sha256"), bench.ckpt.get("exported_from_sha256")):
                raise UserError(f"--heads {label}={path} was trained on another base than --ckpt: "
                                "an ablation must compare heads of one base")
            _, other = load_model(hckpt, device, base.lm_head.weight.dtype)
            prepack_bf16_linears(other)
            record = {"head": label, "loss": hckpt["train_config"].get("loss", "?"),
                      "teacher_data": hckpt.get("data_kind") or hckpt["train_config"].get("teacher_data", "?"), "step": hckpt.get("step", "?")}
            for mode in ("greedy", "sampling"):
                for k in Ks:
                    runs = run_methods(base, [orthrus_method(base, other, k)], prompts, n_new, mode == "sampling", 1,
                                       device, bench.stop_ids)
                    stats = next(iter(runs.values()))["stats"]
                    record[f"{mode}_K{k}"] = sum(s.cycle_tokens for s in stats) / sum(s.cycles for s in stats)
            records.append(record)
        results["heads"] = {r["head"]: r for r in records}
        print(f"\n### Head training variants: tokens/cycle on the same base and prompts ({n_new} new tokens)\n")
        print(table([("head", "{head}"), ("loss", "{loss}"), ("teacher data", "{teacher_data}"), ("steps", "{step}")]
                    + [(f"{mode} K={k}", f"{{{mode}_K{k}:.2f}}") for mode in ("greedy", "sampling") for k in Ks], records))

    if "prompt-length" in which and bench.data_dir is None:
        print("\n(prompt-length ablation skipped: it takes val windows of prepared data, not --prompts)")
    elif "prompt-length" in which:
        ctx, new = base.config.context_len, min(64, n_new)
        methods = [ar_method(), orthrus_method(base, head, K)]
        records = []
        for length in counts(args.prompt_lens, "--prompt-lens"):
            if length + new > ctx:
                continue
            ps = val_prompts(bench.data_dir, bench.meta, args.num_prompts, length)
            runs = run_methods(base, methods, ps, new, False, args.repeats, device)
            ar_run, o_run = runs[methods[0].label], runs[methods[1].label]
            total = sum(len(o) for o in ar_run["outs"])
            records.append({"prompt_tokens": length, "ar_tokens_per_s": total / ar_run["seconds"],
                            "orthrus_tokens_per_s": total / o_run["seconds"], "speedup": ar_run["seconds"] / o_run["seconds"],
                            "tokens_per_cycle": sum(s.cycle_tokens for s in o_run["stats"]) / sum(s.cycles for s in o_run["stats"])})
        results["prompt_length"] = {r["prompt_tokens"]: r for r in records}
        print(f"\n### Prompt length toward the context limit ({ctx}): {new} new tokens, Orthrus K={K}, greedy\n")
        print(table([("prompt tokens", "{prompt_tokens}"), ("AR tokens/s", "{ar_tokens_per_s:,.0f}"),
                     ("Orthrus tokens/s", "{orthrus_tokens_per_s:,.0f}"), ("speedup", "{speedup:.2f}x"),
                     ("tokens/cycle", "{tokens_per_cycle:.2f}")], records))

    if "memory" in which:
        cfg, dtype = base.config, base.lm_head.weight.dtype
        transient = DiffusionDrafter(base, head, K).transient_bytes()
        drafter = DraftModelDrafter(bench.draft_model, 1) if bench.draft_model is not None else None
        records = []
        for n in sorted({64, 128, 256, cfg.context_len // 2, cfg.context_len, 4 * cfg.context_len, 32 * cfg.context_len}):
            draft_kv = drafter.persistent_bytes(n) if drafter else None
            records.append({"context": n, "base_kv": kv_bytes(cfg, n, dtype), "orthrus_transient": transient,
                            "draft_model_kv": draft_kv, "base_kv_text": fmt_bytes(kv_bytes(cfg, n, dtype)),
                            "transient_text": fmt_bytes(transient),
                            "draft_text": fmt_bytes(draft_kv) if drafter else "(no --draft-ckpt)"})
        results["memory"] = {r["context"]: r for r in records}
        print(f"\n### Memory beyond the base model's own KV cache, by context length (bytes of K/V, {dtype}; "
              f"rows past {cfg.context_len} are the same formula at longer contexts)\n")
        print(table([("context tokens", "{context}"), ("base KV cache (both)", "{base_kv_text}"),
                     ("Orthrus extra persistent", "0 B"), (f"Orthrus transient (one K={K} block)", "{transient_text}"),
                     ("draft model's KV cache (persistent)", "{draft_text}")], records))

    if "tokenizer" in which and args.tokenizer_ckpts:
        texts = [bench.tokenizer.decode(p) for p in prompts]
        # every model generates about as many characters as n_new tokens of the main checkpoint
        chars_wanted = n_new * sum(map(len, texts)) / sum(map(len, prompts))
        records = []
        for label, path in labelled_paths(args.tokenizer_ckpts, "--tokenizer-ckpts"):
            tckpt = load_checkpoint(path)
            tbase, thead = load_model(tckpt, device, base.lm_head.weight.dtype)
            prepack_bf16_linears(tbase, thead)
            if thead is None:
                raise UserError(f"--tokenizer-ckpts {label}={path} has no diffusion head")
            ttok = load_ckpt_tokenizer(tckpt)
            encoded = [ttok.encode(t) for t in texts]
            chars_per_token = sum(map(len, texts)) / sum(map(len, encoded))
            t_new = max(8, round(chars_wanted / chars_per_token))
            methods = [ar_method(), orthrus_method(tbase, thead, K)]
            runs = run_methods(tbase, methods, encoded, t_new, False, args.repeats, device)
            chars = [sum(len(ttok.decode(o)) for o in runs[m.label]["outs"]) / runs[m.label]["seconds"] for m in methods]
            o_stats = runs[methods[1].label]["stats"]
            tpc = sum(s.cycle_tokens for s in o_stats) / sum(s.cycles for s in o_stats)
            records.append({"model": label, "tokenizer": ttok.kind, "vocab": ttok.vocab_size,
                            "chars_per_token": chars_per_token, "ar_chars_per_s": chars[0], "orthrus_chars_per_s": chars[1],
                            "speedup": chars[1] / chars[0], "tokens_per_cycle": tpc, "chars_per_cycle": tpc * chars_per_token})
        results["tokenizer"] = {r["model"]: r for r in records}
        print(f"\n### Tokenizers: characters per second (the fair unit), Orthrus K={K}, greedy, ~{chars_wanted:.0f} chars per prompt\n")
        print(table([("model", "{model}"), ("tokenizer", "{tokenizer}"), ("vocab", "{vocab}"),
                     ("chars/token (prompts)", "{chars_per_token:.2f}"), ("AR chars/s", "{ar_chars_per_s:,.0f}"),
                     ("Orthrus chars/s", "{orthrus_chars_per_s:,.0f}"), ("speedup", "{speedup:.2f}x"),
                     ("tokens/cycle", "{tokens_per_cycle:.2f}"), ("chars/cycle", "{chars_per_cycle:.2f}")], records))
    return results


def check_lists(args):
    """The comma-list flags, parsed once up front so a typo is reported before minutes of loading."""
    names_list(args.methods, "--methods", METHODS)
    counts(args.tree_nodes, "--tree-nodes")
    if args.tree_width < 1:
        raise UserError(f"--tree-width must be >= 1, got {args.tree_width}")
    names_list(args.modes, "--modes", ("greedy", "sampling"))
    names_list(args.ablations, "--ablations", ("denoise", "heads", "prompt-length", "memory", "tokenizer"))
    draft_lens(args.draft_lens)
    for flag, text in (("--gammas", args.gammas), ("--lookup-gammas", args.lookup_gammas), ("--prompt-lens", args.prompt_lens)):
        counts(text, flag)
    labelled_paths(args.heads, "--heads")
    labelled_paths(args.tokenizer_ckpts, "--tokenizer-ckpts")


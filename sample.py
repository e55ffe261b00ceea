"""
Generate text from a checkpoint, with plain AR decoding or with Orthrus, and compare the two.

    python sample.py --ckpt out/head/ckpt.pt --prompt "def "                  # Orthrus (head present)
    python sample.py --ckpt out/head/ckpt.pt --prompt "def " --mode compare   # AR vs Orthrus side by side
    python sample.py --ckpt out/head/ckpt.pt --prompt "def " --trace          # show accepted/rejected drafts
    python sample.py --ckpt out/base/ckpt.pt --prompt "import " --temperature 0.8 --top-k 50
    python sample.py --ckpt path/to/Qwen3-0.6B --chat --prompt "Write a haiku about caches."   # a real model
    python sample.py --ckpt SmolLM2-135M-Instruct.Q4_1.gguf --chat                           # (HF folder or .gguf)

Temperature 0 (the default) is greedy: Orthrus then returns exactly the AR model's text.
Decoding runs on one CPU thread by default (--threads): small models gain little from a second
thread, and two OpenMP threads slow down ~10x whenever another process keeps a core busy.
"""

import dataclasses
import json
import os
import sys

import torch

from checkpoint import open_model
from cli import ArgumentParser, add_runtime_flags, add_sampling_flags, parse_dtype, pick_device, run_cli, set_threads
from decoding import check_prompt, prepack_bf16_linears
from diffusion_head import DRAFT_LEN, check_draft_lens
from errors import UserError
from orthrus import DiffusionDrafter, generate, generate_speculative
from pretrained import chat_prompt
from sampling import Sampling
from tree_and_fused import FusedDiffusionDrafter, TreeDrafter

DEFAULT_PROMPT = "def "  # shows the shipped stdlib model writing Python; a newline gave only spaces
DEFAULT_CHAT_PROMPT = "Write a Python function that tells whether a number is prime."


def build_parser():
    p = ArgumentParser(__doc__)
    p.add_argument("--ckpt", required=True, help="a checkpoint from train.py (base, base+head, or a head for a "
                   "pretrained base), a Hugging Face model folder, a .gguf file or an official Orthrus folder")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat format (ChatML) and stop "
                   "at its end of turn")
    p.add_argument("--prompt", default=None, help=f"prompt text (default: {DEFAULT_PROMPT!r}; with --chat: "
                   f"{DEFAULT_CHAT_PROMPT!r})")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file instead (- or /dev/stdin: "
                   "from a pipe)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens to generate (stops early at the context limit or end-of-text)")
    add_sampling_flags(p)
    add_runtime_flags(p, threads=1, dtypes=("float32", "float64", "bfloat16"))
    p.add_argument("--mode", default=None, choices=["orthrus", "ar", "compare"],
                   help="decoder: orthrus (default when the checkpoint has a head), ar, or compare (both)")
    p.add_argument("--draft-len", type=int, default=None,
                   help=f"Orthrus draft block length K, K-1 drafts per cycle (default: {DRAFT_LEN}, or the "
                        "head's longest trained length if shorter; shortened near the end of the context)")
    p.add_argument("--denoise-steps", type=int, default=1, help="Orthrus diffusion passes per draft (1 = the paper's default)")
    p.add_argument("--tree-nodes", type=int, default=0,
                   help="greedy Orthrus: verify a token tree of this many draft nodes (the head's top --tree-width "
                        "tokens per position, most probable paths first) in one pass instead of a chain (0 = chain)")
    p.add_argument("--tree-width", type=int, default=4, help="with --tree-nodes: candidate tokens per position")
    p.add_argument("--fused", action="store_true",
                   help="one forward per cycle: the verify pass also drafts the next block for the likely "
                        "acceptances (needs a head trained with --mask-first; chains only)")
    p.add_argument("--base", default=None, help="a head for a pretrained base: where the base model is, if it is "
                   "not where the head recorded it (moved, or another copy of the same file)")
    p.add_argument("--trace", action="store_true", help="show each cycle's accepted drafts, rejected tail and bonus token")
    return p


class TextStream:
    """Prints decoded text as tokens arrive. Decodes everything committed so far and prints the
    new suffix, holding back a trailing U+FFFD (a multi-byte character cut between tokens)."""

    def __init__(self, tokenizer, enabled=True, hidden_ids=()):
        self.tokenizer, self.enabled, self.ids, self.printed = tokenizer, enabled, [], 0
        self.hidden_ids = set(hidden_ids)  # end-of-text / end-of-turn: they end the text, they are not text

    def __call__(self, new_ids):
        self.ids.extend(i for i in new_ids if i not in self.hidden_ids)
        text = self.tokenizer.decode(self.ids)
        stable = len(text.rstrip("\ufffd"))
        if self.enabled and stable > self.printed:
            sys.stdout.write(text[self.printed : stable])
            sys.stdout.flush()
        self.printed = max(self.printed, stable)

    def finish(self):
        text = self.tokenizer.decode(self.ids)
        if self.enabled and len(text) > self.printed:
            sys.stdout.write(text[self.printed :])
        if self.enabled:
            sys.stdout.write("\n")
            sys.stdout.flush()
        return text


class Tracer:
    """One line per Orthrus cycle: accepted drafts, the rejected draft tail, and the AR view's
    token (bonus or correction). Colour on a terminal, plain markers otherwise."""

    def __init__(self, tokenizer, colour):
        self.tokenizer, self.colour, self.cycle = tokenizer, colour, 0

    def show(self, ids):
        return repr(self.tokenizer.decode(ids))[1:-1]

    def __call__(self, c):
        self.cycle += 1
        path = c.get("path", range(c["accepted"]))  # a token tree: the accepted branch, then the other nodes
        ok = [c["drafts"][i] for i in path]
        bad = [d for i, d in enumerate(c["drafts"]) if i not in set(path)]
        nxt = self.show([c["next"]])
        if self.colour:
            line = f"\033[32m{self.show(ok)}\033[0m\033[9;31m{self.show(bad)}\033[0m\033[1;36m{nxt}\033[0m"
        else:
            line = f"[ok:{self.show(ok)}][x:{self.show(bad)}][+:{nxt}]"
        print(f"cycle {self.cycle:>4} | accepted {c['accepted']:>2}/{len(c['drafts'])} | {line}", file=sys.stderr)


def read_prompt(args):
    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        if os.path.isdir(args.prompt_file):
            raise UserError(f"prompt file {args.prompt_file!r} is a directory; pass a text file")
        if args.prompt_file != "-" and not os.path.exists(args.prompt_file):  # a pipe (/dev/stdin) is no regular file
            raise UserError(f"prompt file {args.prompt_file!r} not found")
        if args.prompt_file == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.prompt_file, "rb") as f:
                data = f.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"prompt file {args.prompt_file!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if args.prompt is None:
        return DEFAULT_CHAT_PROMPT if args.chat else DEFAULT_PROMPT
    return args.prompt


def check_flags(args) -> Sampling:
    """Every flag that needs no model, checked before anything is loaded. Returns the sampling settings."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not 0 <= args.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    if args.draft_len is not None:
        check_draft_lens([args.draft_len], "--draft-len")
    if args.denoise_steps < 1:
        raise UserError(f"--denoise-steps must be >= 1, got {args.denoise_steps}")
    if args.tree_nodes < 0 or args.tree_width < 1:
        raise UserError(f"--tree-nodes must be >= 0 and --tree-width >= 1, got {args.tree_nodes} and {args.tree_width}")
    if args.fused and (args.tree_nodes or args.denoise_steps > 1):
        raise UserError("--fused drafts chains in one denoising step: drop --tree-nodes / --denoise-steps")
    if args.tree_nodes and args.temperature > 0:
        raise UserError("--tree-nodes is for greedy decoding (--temperature 0); sampling verifies a chain")
    return Sampling(args.temperature, args.top_k, args.top_p)


def holds_no_head(path) -> bool:
    """A model known to have no diffusion head without loading it: a .gguf file, or a Hugging Face
    folder whose config.json lacks the official Orthrus format's block_size and mask_token_id."""
    if str(path).endswith(".gguf") and os.path.isfile(path):
        return True
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            cfg = json.load(f)
    except ValueError:
        return False  # open_model says what is wrong with it
    return isinstance(cfg, dict) and "block_size" not in cfg and "mask_token_id" not in cfg


def describe(stats):
    line = (f"{stats.method}: {stats.new_tokens} tokens in {stats.prefill_seconds + stats.decode_seconds:.2f}s "
            f"= {stats.tokens_per_second:.1f} tok/s (prefill {1000 * stats.prefill_seconds:.1f} ms)")
    if stats.method.startswith("orthrus"):
        line += (f" | {stats.tokens_per_cycle:.2f} tokens/cycle, {stats.tokens_per_forward:.2f} tokens/forward "
                 f"(draft+verify passes counted) over {stats.cycles} cycles")
    if stats.stop_reason == "context_limit":
        line += " | stopped at the context limit"
    elif stats.stop_reason == "eos":
        line += " | stopped at an end token (end of text or end of turn)"
    return line


def main(argv=None):
    args = build_parser().parse_args(argv)
    settings = check_flags(args)
    prompt_text = read_prompt(args)
    if args.chat and not prompt_text.strip():
        raise UserError("the prompt is empty: with --chat give the user's message as --prompt TEXT or --prompt-file")
    if args.mode == "compare" and holds_no_head(args.ckpt):  # said now, not after seconds of loading
        raise UserError(f"--mode compare needs a checkpoint with a diffusion head; {args.ckpt} is a plain model "
                        "(train a head on it with `python train.py --stage head --base-ckpt PATH`)")
    device = pick_device(args.device, verbose=False)
    set_threads(args.threads)
    base, head, tokenizer, info = open_model(args.ckpt, device, parse_dtype(args.dtype), base_path=args.base)
    prepack_bf16_linears(base, *([head] if head is not None else []))  # bf16 on a CPU: oneDNN's layout, once
    stop_ids = list(info["stop_ids"])
    if args.chat:
        prompt, end_of_turn = chat_prompt(tokenizer, prompt_text)
        stop_ids.append(end_of_turn)
    else:
        prompt = tokenizer.encode(prompt_text)
    check_prompt(base.config, prompt)  # every input check before any output: a bad input gives one line
    mode = args.mode or "orthrus"
    if head is None and mode == "compare":
        raise UserError("--mode compare needs a checkpoint with a diffusion head (train one with --stage head)")
    if head is None and mode == "orthrus":
        print("note: this checkpoint has no diffusion head; running plain AR decoding", file=sys.stderr)
        mode = "ar"
    # default: DRAFT_LEN, or the longest length the head was trained for if that is shorter
    draft_len = args.draft_len or min(DRAFT_LEN, head.max_draft_len if head else DRAFT_LEN)
    if mode != "ar":
        room = base.config.context_len - len(prompt)
        if args.draft_len is not None and args.draft_len > room:  # the default just shortens itself
            raise UserError(f"--draft-len {args.draft_len} exceeds the {room} positions left in the context "
                            f"after a {len(prompt)}-token prompt; use a shorter draft or prompt")
        if draft_len > head.max_draft_len:
            print(f"warning: --draft-len {draft_len} is longer than the head was trained for "
                  f"(max {head.max_draft_len}); drafts at the far end will mostly be rejected", file=sys.stderr)
    decode_args = dict(max_new_tokens=args.max_new_tokens, eos_ids=stop_ids)

    def run(method, stream_enabled, **overrides):
        stream_enabled = stream_enabled and not (args.trace and method == "orthrus")  # trace lines instead
        sampling = dataclasses.replace(settings, generator=torch.Generator(device=device).manual_seed(args.seed))
        stream = TextStream(tokenizer, stream_enabled, hidden_ids=stop_ids)
        shown_prompt = prompt_text + ("\n" if args.chat else "")  # a chat answer starts on its own line
        if stream_enabled:
            sys.stdout.write(shown_prompt)
        kwargs = {**decode_args, "sampling": sampling, "on_tokens": stream, **overrides}
        if method == "ar":
            tokens, stats = generate(base, prompt, **kwargs)
        else:
            tracer = Tracer(tokenizer, sys.stderr.isatty()) if args.trace else None
            drafter = make_drafter()
            tokens, stats = generate_speculative(base, drafter, prompt, on_cycle=tracer, **kwargs)
        text = stream.finish()
        if args.trace and method == "orthrus":
            print(shown_prompt + text)
        return tokens, stats

    def make_drafter():
        if args.fused:
            return FusedDiffusionDrafter(base, head, draft_len)
        if args.tree_nodes:
            return TreeDrafter(base, head, draft_len, args.tree_nodes, args.tree_width)
        return DiffusionDrafter(base, head, draft_len, args.denoise_steps)

    def memory_line():
        drafter = DiffusionDrafter(base, head, draft_len)
        return (f"{drafter.extra_params() / 1e6:.2f}M head parameters, {drafter.persistent_bytes(len(prompt))} bytes "
                f"persistent cache, {drafter.transient_bytes() / 1024:.1f} KiB transient per draft block (K={draft_len})")

    if mode in ("ar", "orthrus"):
        _, stats = run(mode, True)
        print(describe(stats), file=sys.stderr)
        if mode == "orthrus":
            print(f"memory: the head adds only one draft block's transient K/V: {memory_line()}", file=sys.stderr)
        return stats

    # compare: the same prompt and seed through both decoders, after an untimed warm-up of each
    # (first calls pay for allocations and lazily built tables, which would skew a short run)
    for method in ("ar", "orthrus"):
        run(method, False, max_new_tokens=min(8, args.max_new_tokens), on_tokens=None)
    print("--- AR ---", file=sys.stderr)
    ar_tokens, ar_stats = run("ar", True)
    print("--- Orthrus ---", file=sys.stderr)
    o_tokens, o_stats = run("orthrus", True)
    print(describe(ar_stats), file=sys.stderr)
    print(describe(o_stats), file=sys.stderr)
    if settings.is_greedy:
        same = "IDENTICAL" if ar_tokens == o_tokens else "DIFFERENT (low-precision near-ties: see README, Exactness)"
        print(f"outputs: {same} ({len(ar_tokens)} vs {len(o_tokens)} tokens)", file=sys.stderr)
    else:
        print("outputs: sampled (temperature > 0): identically distributed, not identical token for token", file=sys.stderr)
    print(f"speedup: {o_stats.tokens_per_second / ar_stats.tokens_per_second:.2f}x tokens/s | extra memory: "
          f"{memory_line()}", file=sys.stderr)
    return ar_stats, o_stats


if __name__ == "__main__":
    run_cli(main)

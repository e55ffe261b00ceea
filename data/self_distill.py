"""
Self-distillation data: text written by the base model itself, the teacher data Orthrus' head is
trained on in the paper (arXiv 2605.12825, Sec. 3.3; docs/method.md, "Training").

Each row is a prompt of --prompt-len tokens taken from the prepared corpus, continued by the base's
own SAMPLES up to --row-len tokens (greedy text of small models loops). Rows are written in shards
as they are generated, so an interrupted run resumes where it stopped (run the same command again).

    python data/self_distill.py --base-ckpt out/base/ckpt.pt --data-dir data/stdlib --out-dir data/self_stdlib
    python train.py --stage head --preset cpu --base-ckpt out/base/ckpt.pt --data-dir data/self_stdlib

The output folder holds rows_00000.pt, ... (int64 tensors (rows, row_len)) and a meta.json that
train.py reads like prepare.py's: the tokenizer, the base it came from (sha256), the folder whose
val split evaluates the head (the corpus's: held-out text, not the base's own).
"""

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from common import (ArgumentParser, UserError, build_base, load_checkpoint, pick_device, read_data_meta,  # noqa: E402
                    run_cli, save_checkpoint, state_sha256)
from sampling import Sampling  # noqa: E402
from tokenizer import load_tokens  # noqa: E402


def build_parser():
    p = ArgumentParser(__doc__)
    p.add_argument("--base-ckpt", required=True, help="the base model that writes the text (train.py --stage base)")
    p.add_argument("--data-dir", default="data/stdlib", help="prepared corpus (data/prepare.py) the prompts come from")
    p.add_argument("--out-dir", required=True, help="where the rows and meta.json go")
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens to generate in all (rows x row length)")
    p.add_argument("--row-len", type=int, default=0, help="tokens per row, prompt included (0 = the base's context)")
    p.add_argument("--prompt-len", type=int, default=32, help="corpus tokens that open each row")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (> 0: greedy text loops)")
    p.add_argument("--top-k", type=int, default=0, help="top-k for sampling (0 = off)")
    p.add_argument("--batch-size", type=int, default=64, help="rows generated together (one shard each)")
    p.add_argument("--seed", type=int, default=1337, help="seeds the prompt choice and the sampler")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    return p


@torch.no_grad()
def continue_prompts(base, prompts: torch.Tensor, length: int, sampling: Sampling) -> torch.Tensor:
    """(B, P) prompts -> (B, length) rows: each prompt continued by the base's samples, all rows of
    the batch decoded together over one KV cache."""
    B, P = prompts.shape
    cache = base.new_cache(batch_size=B, capacity=length)
    out = [prompts]
    logits = base(prompts, cache, logits="last")[:, 0]  # (B, V)
    for i in range(length - P):
        token = sampling.choose(logits.float()).view(B, 1)
        out.append(token)
        if i + 1 < length - P:  # the last token is never fed
            logits = base(token, cache, logits="last")[:, 0]
    return torch.cat(out, 1)


def fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def main(argv=None):
    args = build_parser().parse_args(argv)
    for name in ("tokens", "prompt_len", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.row_len < 0 or args.seed < 0 or args.top_k < 0:
        raise UserError("--row-len, --seed and --top-k must be >= 0")
    sampling = Sampling(args.temperature, args.top_k)
    if sampling.is_greedy:
        raise UserError("--temperature must be > 0: greedy continuations of a small model loop")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out-dir {args.out_dir!r} is a file; pass a folder")
    meta = read_data_meta(args.data_dir)
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.base_ckpt)
    if ckpt["tokenizer"] != meta["tokenizer"]:
        raise UserError(f"--data-dir {args.data_dir} was tokenized with {meta['tokenizer']['kind']} but the base "
                        f"uses {ckpt['tokenizer']['kind']}; prepare the data with the base's tokenizer")
    base = build_base(ckpt, device).requires_grad_(False).eval()
    row_len = args.row_len or base.config.context_len
    if not args.prompt_len < row_len <= base.config.context_len:
        raise UserError(f"need --prompt-len ({args.prompt_len}) < --row-len ({row_len}) <= the base's context "
                        f"({base.config.context_len})")
    train = load_tokens(os.path.join(args.data_dir, "train.bin"), meta["dtype"])
    if train.numel() <= args.prompt_len:
        raise UserError(f"{args.data_dir}/train.bin has {train.numel()} tokens, too few for prompts of {args.prompt_len}")

    out_meta = {**meta, "kind": "self-distilled", "source_data_dir": os.path.abspath(args.data_dir),
                "base_sha256": state_sha256(ckpt["model"]), "row_len": row_len, "prompt_len": args.prompt_len,
                "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed, "batch_size": args.batch_size}
    meta_path = os.path.join(args.out_dir, "meta.json")
    if os.path.exists(meta_path):  # resuming: it must be the same job
        with open(meta_path) as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in out_meta if k != "n_rows"} != out_meta:
            raise UserError(f"{args.out_dir} holds rows of another configuration or base; pick a new --out-dir")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(meta_path, "w") as f:
        json.dump(out_meta, f, indent=1)

    n_shards = -(-max(1, args.tokens // row_len) // args.batch_size)
    # every shard's prompts and sampler come from its own seed: a resumed run writes the same rows
    t0, made = time.time(), 0
    for shard in range(n_shards):
        path = os.path.join(args.out_dir, f"rows_{shard:05d}.pt")
        if os.path.exists(path):
            continue
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + shard)
        starts = torch.randint(0, train.numel() - args.prompt_len, (args.batch_size,), generator=g).tolist()
        prompts = torch.stack([train[s : s + args.prompt_len].long() for s in starts]).to(device)
        shard_sampling = Sampling(args.temperature, args.top_k, 1.0, torch.Generator(device=device).manual_seed(g.initial_seed() + 1))
        save_checkpoint(continue_prompts(base, prompts, row_len, shard_sampling).cpu(), path)
        made += 1
        rate = made * args.batch_size * (row_len - args.prompt_len) / (time.time() - t0)
        left = sum(not os.path.exists(os.path.join(args.out_dir, f"rows_{i:05d}.pt")) for i in range(n_shards))
        print(f"shard {shard + 1}/{n_shards} | {rate:,.0f} generated tok/s | ETA "
              f"{fmt_time(left * args.batch_size * (row_len - args.prompt_len) / rate)}", flush=True)
    out_meta["n_rows"] = n_shards * args.batch_size
    with open(meta_path, "w") as f:
        json.dump(out_meta, f, indent=1)
    print(f"done: {out_meta['n_rows']} rows of {row_len} tokens in {args.out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)

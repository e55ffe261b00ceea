"""
Shrink a training checkpoint into a shippable one: weights only (no optimizer state, no data
RNG), cast to float16 or bfloat16. Loading casts them back to the inference dtype (float32 on a
CPU), so a 16-bit file decodes at full speed; Orthrus stays exact because its guarantee is
relative to the base weights actually loaded, and the head's hash check is redone for the
16-bit base (the original hash is kept as `exported_from_sha256`).

    python export.py --ckpt out/head/ckpt.pt --out checkpoints/orthrus_stdlib_byte.pt

A head trained on a pretrained base (kind "orthrus-head") is exported the same way, head only: the
base stays in its Hugging Face folder or .gguf file.

`--format official` writes base + head as an official Orthrus folder instead (a Qwen3 Hugging
Face folder with `block_size`, `mask_token_id` and per-layer `*_diff` tensors), so the official
code can run a head trained here; how the MASK embedding is placed without changing the AR model's
outputs is explained in pretrained/official.py (export_official):

    python export.py --ckpt out/qwen3_head/ckpt.pt --format official --out out/orthrus-qwen3-folder
"""

import os

import torch

from checkpoint import load_checkpoint, load_model, open_model, save_checkpoint, state_sha256
from cli import ArgumentParser, check_writable, parse_dtype, run_cli, writing_into
from errors import UserError
from pretrained.official import export_official

KEEP = ("kind", "format_version", "model_config", "model", "tokenizer", "tokenizer_model", "data_dir", "head_config",
        "head", "base_sha256", "base_path", "step", "train_config", "data_kind")


def export_checkpoint(ckpt: dict, dtype: torch.dtype) -> dict:
    """The weights-only, 16-bit copy of a base or base+head checkpoint."""
    out = {k: ckpt[k] for k in KEEP if k in ckpt}
    for key in ("model", "head"):
        if key in out:
            out[key] = {name: t.to(dtype) if t.is_floating_point() else t for name, t in out[key].items()}
    if ckpt["kind"] == "orthrus":
        out["exported_from_sha256"] = ckpt["base_sha256"]
        out["base_sha256"] = state_sha256(out["model"])  # the base the head now runs against
    out["exported_dtype"] = str(dtype).replace("torch.", "")
    return out


def main(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--ckpt", required=True, help="a checkpoint written by train.py")
    p.add_argument("--out", required=True, help="where to write the shippable checkpoint (a folder for --format official)")
    p.add_argument("--format", default="orthrus", choices=["orthrus", "official"],
                   help="orthrus: a weights-only .pt; official: an official Orthrus Hugging Face folder (Qwen3 bases)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="storage dtype of the weights")
    args = p.parse_args(argv)
    if args.format == "official":
        return export_official_folder(args)
    if os.path.abspath(args.ckpt) == os.path.abspath(args.out):
        raise UserError("--out must differ from --ckpt (the training checkpoint is kept for --resume)")
    if args.dtype == "float32":
        raise UserError("--dtype float32 is for --format official; a shipped .pt is float16 or bfloat16")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; pass a file name, e.g. {os.path.join(args.out, 'model.pt')}")
    ckpt = load_checkpoint(args.ckpt)
    load_model(ckpt)  # a damaged checkpoint fails here, with its one-line reason, not in the shipped copy
    out = export_checkpoint(ckpt, parse_dtype(args.dtype))
    try:
        save_checkpoint(out, args.out)
    except OSError as e:  # a parent that is a file, no permission, a full disk
        raise UserError(f"cannot write --out {args.out} ({e.strerror or type(e).__name__}); "
                        "pass a path in a folder you can write to") from None
    n_params = sum(t.numel() for key in ("model", "head") for t in out.get(key, {}).values())
    print(f"wrote {args.out}: {n_params / 1e6:.2f}M parameters in {args.dtype}, "
          f"{os.path.getsize(args.out) / 1e6:.2f} MB (from {os.path.getsize(args.ckpt) / 1e6:.2f} MB)")
    return args.out


def export_official_folder(args):
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UserError(f"--out {args.out} exists and is not an empty folder; pass a new folder")
    check_writable(args.out, "--out")  # before the model is loaded
    base, head, tokenizer, info = open_model(args.ckpt)
    if head is None:
        raise UserError(f"{args.ckpt} has no diffusion head: train one with `python train.py --stage head`")
    source = info.get("path") if info.get("format") != "orthrus-head" else info["ckpt"]["base_path"]
    source = source if source and os.path.isdir(source) else None  # tokenizer files come from a HF folder, else are written
    with writing_into(args.out, "--out"):
        summary = export_official(base, head, args.out, tokenizer=tokenizer, source=source, dtype=parse_dtype(args.dtype))
    print(f"wrote {args.out}: official Orthrus folder ({args.dtype}); {summary}")
    return args.out


if __name__ == "__main__":
    run_cli(main)

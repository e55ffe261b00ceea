"""
What every script shares, in one place: device and dtype selection, checkpoint save/load (atomic
writes, `weights_only` loads, clear errors), flags generated from config dataclasses, and the
one-line error reporting of the command-line tools.
"""

import argparse
import contextlib
import dataclasses
import hashlib
import os
import re
import sys

import torch

from errors import UserError
from model import GPT, GPTConfig

# ---------------------------------------------------------------------------------------------
# Errors: a user mistake is one line on stderr and exit code 2, never a stack trace. Only
# UserError (errors.py) is a user mistake; any other exception is our bug and keeps its traceback.


def run_cli(main, argv=None):
    """Run a script's main(argv), turning user mistakes into `error: ...` and exit code 2, and
    Ctrl-C into one line and exit code 130."""
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default unless its help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        silent = default is None or default is False or default is argparse.SUPPRESS or default == ""
        if action.option_strings and "default" not in text and not silent:
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is the same one-line `error: ...` (exit 2) as every other mistake,
    not the usage block. `--help` still prints everything, with the defaults."""

    def __init__(self, description=None, **kwargs):
        super().__init__(description=description, formatter_class=_HelpFormatter, **kwargs)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


# ---------------------------------------------------------------------------------------------
# Device and dtype


def available_devices() -> list:
    """The --device values that work on this machine (besides 'auto')."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def pick_device(requested: str = "auto", verbose: bool = True) -> torch.device:
    """'auto' picks cuda, then mps, then cpu, and says which and why. Anything else must be a
    device this machine has (cpu, cuda, cuda:N, mps): checked here, before anything is loaded."""
    if requested != "auto":
        here = "available here: " + ", ".join(["auto"] + available_devices())
        try:
            device = torch.device(requested)
        except (RuntimeError, ValueError, TypeError):
            raise UserError(f"unknown --device {requested!r} ({here})") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {requested} requested but CUDA is not available ({here})")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s) ({here})")
        if device.type == "mps" and "mps" not in available_devices():
            raise UserError(f"--device {requested} requested but Apple MPS is not available ({here})")
        if device.type not in ("cpu", "cuda", "mps"):
            raise UserError(f"--device {requested} is not supported: use cpu, cuda, cuda:N or mps ({here})")
        why = "requested"
    elif torch.cuda.is_available():
        device, why = torch.device("cuda"), f"CUDA available ({torch.cuda.get_device_name(0)})"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device, why = torch.device("mps"), "Apple MPS available"
    else:
        n = torch.get_num_threads()
        device, why = torch.device("cpu"), f"no accelerator; {n} CPU thread{'s' if n != 1 else ''}"
    if verbose:
        print(f"device: {device} ({why})")
    return device


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 / AMX); elsewhere bf16 is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_autocast_dtype(device: torch.device, requested: str = "auto", verbose: bool = True):
    """The autocast dtype for training: bf16 where the hardware runs it natively, else None (fp32)."""
    if requested == "float32":
        dtype, why = None, "requested"
    elif requested == "bfloat16":
        dtype, why = torch.bfloat16, "requested"
    elif requested != "auto":
        raise UserError(f"unknown --dtype {requested!r}: use auto, float32 or bfloat16")
    elif device.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype, why = torch.bfloat16, "CUDA supports bf16"
    elif device.type == "cpu" and cpu_has_fast_bf16():
        dtype, why = torch.bfloat16, "this CPU has native bf16 (AMX/AVX512-BF16)"
    else:
        dtype, why = None, "no native bf16 on this device"
    if verbose:
        print(f"autocast: {'bfloat16' if dtype else 'off (float32)'} ({why})")
    return dtype


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Flags from dataclasses


def add_dataclass_flags(parser, cls, skip=()):
    """One flag per dataclass field (--field-name), with the field's help text and default."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        # the flag's own default is None ("not given", so presets can fill it); show the real one,
        # unless it is empty (the help text then says what an empty value means)
        help_text = f.metadata.get("help", "")
        if f.default != "" and "default:" not in help_text:
            help_text += f" (default: {f.default})"
        help_text = help_text.replace("%", "%%")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, type=_parse_bool, default=None, metavar="BOOL", help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            parser.add_argument(flag, type=kind, default=None, choices=f.metadata.get("choices"), help=help_text)
    return parser


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {s!r}")


def dataclass_from(cls, *layers: dict):
    """Build a dataclass from defaults overridden by each dict in turn (None values are skipped)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for layer in layers:
        values.update({k: v for k, v in layer.items() if k in names and v is not None})
    return cls(**values)


# ---------------------------------------------------------------------------------------------
# Checkpoints
#
# A checkpoint is data, never code: a dict of plain types and tensors, loaded with
# torch.load(weights_only=True). Three kinds:
#   kind "orthrus-base": {model_config, model, tokenizer, optimizer, step, train_config, ...}
#   kind "orthrus":      the base's model_config/model/tokenizer plus {head_config, head,
#                        base_sha256, base_ckpt}: base + head in one self-contained file.
#   kind "orthrus-head": a head for a pretrained base (a Hugging Face folder or .gguf file) that
#                        is too big to copy: {head_config, head, base_path, base_sha256 (of the
#                        base loaded in float32), tokenizer}; the base is read from base_path.

CHECKPOINT_KINDS = ("orthrus-base", "orthrus", "orthrus-head")


def save_checkpoint(obj: dict, path: str):
    """Write atomically: a temp file in the same folder, flushed to disk, then renamed over `path`.
    A crash mid-write leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _summary(e: BaseException, limit: int = 100, text: str | None = None) -> str:
    """`Type: first non-empty line of the message` (or of `text`), cut at a word boundary: never
    an IndexError on an empty message, never a word cut in half."""
    lines = [line.strip() for line in (str(e) if text is None else text).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + " ..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# what each kind must hold, and the type of each entry (checked before anything is built from it)
REQUIRED_FIELDS = {
    "orthrus-base": {"model_config": dict, "model": dict, "tokenizer": dict},
    "orthrus": {"model_config": dict, "model": dict, "tokenizer": dict, "head_config": dict, "head": dict,
                "base_sha256": str},
    "orthrus-head": {"head_config": dict, "head": dict, "base_path": str, "base_sha256": str, "tokenizer": dict},
}


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load one of our checkpoints, with a one-line error for every way it can be wrong."""
    if not path:
        raise UserError("no checkpoint given: pass --ckpt PATH (train one with `python train.py --preset cpu`)")
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path!r} not found (train one with `python train.py --preset cpu`)")
    if os.path.isdir(path):
        raise UserError(f"checkpoint {path!r} is a folder; pass the .pt file inside it (e.g. {os.path.join(path, 'ckpt.pt')})")
    if os.path.getsize(path) == 0:
        raise UserError(f"checkpoint {path!r} is empty (0 bytes): an interrupted copy or download? copy it again")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, zip errors, unsafe globals: all mean "not ours"
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if unsafe:
            raise UserError(f"{path!r} holds pickled Python objects ({unsafe.group(1)}), which a weights-only load "
                            "refuses: orthrus checkpoints are plain tensors and dicts written by train.py or export.py") from None
        # the weights-only refusal is a paragraph of advice; its reason follows "WeightsUnpickler error:"
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        reason = _summary(e, text=detail.group(1) if detail else None)
        raise UserError(f"{path!r} is not a readable orthrus checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") not in CHECKPOINT_KINDS:
        raise UserError(f"{path!r} is not an orthrus checkpoint (expected a dict with kind in {CHECKPOINT_KINDS})")
    for field, kind in REQUIRED_FIELDS[ckpt["kind"]].items():
        if not isinstance(ckpt.get(field), kind):
            problem = "has no" if field not in ckpt else f"has a {type(ckpt[field]).__name__} as"
            raise UserError(f"{path!r} ({ckpt['kind']}) {problem} {field!r}: the file is incomplete or was edited; "
                            "use a checkpoint written by train.py or export.py")
    return ckpt


def _check_state_dict(module: torch.nn.Module, state: dict, what: str):
    """Name what does not fit, before load_state_dict's multi-line message can: missing and
    unexpected tensors, values that are not tensors, wrong shapes."""
    expected = module.state_dict()

    def names(keys):
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    problems = []
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing:
        problems.append(f"missing tensor(s) {names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s) {names(unexpected)}")
    not_tensors = [k for k in set(expected) & set(state) if not isinstance(state[k], torch.Tensor)]
    if not_tensors:
        problems.append(f"not a tensor: {names(not_tensors)}")
    wrong = sorted(k for k in set(expected) & set(state) if k not in not_tensors and state[k].shape != expected[k].shape)
    if wrong:
        k = wrong[0]
        problems.append(f"{k} has shape {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
                        + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    if problems:
        raise UserError(f"{what}: {'; '.join(problems)}; the file is damaged or was edited")


def build_base(ckpt: dict, device="cpu", dtype=None) -> GPT:
    """The frozen-or-not base GPT stored in a checkpoint, loaded strictly."""
    config = ckpt["model_config"]
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise UserError(f"the checkpoint's model_config has unknown field(s) {', '.join(map(str, unknown))}: "
                        "it was written by another version of orthrus, or edited")
    try:
        model = GPT(GPTConfig(**config))
    except UserError as e:
        raise UserError(f"the checkpoint's model_config is invalid: {e}") from None
    _check_state_dict(model, ckpt["model"], "the checkpoint's weights do not fit its own model_config")
    model.load_state_dict(ckpt["model"], strict=True)
    model.to(device=device, dtype=dtype or torch.float32)
    return model


def tensor_bytes(t: torch.Tensor):
    """The raw bytes of a tensor's values, as a buffer (no Python-level copy): the storage of
    t.clone(), which holds exactly this tensor (row-major, or in t's own dense layout for a
    permuted view). Works for every dtype (bf16 included) and for 0-d and empty tensors."""
    c = t.detach().cpu().clone()
    return torch.empty(0, dtype=torch.uint8).set_(c.untyped_storage()).numpy()


def state_sha256(state_dict: dict) -> str:
    """A hash of a model's tensors (names, dtypes, shapes, values): identifies a base model
    independently of the file it came in (optimizer state, step, etc. do not count).
    Digest-compatible with the original `bytes(t.clone().untyped_storage())` definition."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def clean_state_dict(module: torch.nn.Module) -> dict:
    """state_dict of the uncompiled module: never `_orig_mod.` keys from torch.compile."""
    return getattr(module, "_orig_mod", module).state_dict()


def load_model(ckpt: dict, device="cpu", dtype=torch.float32):
    """(base GPT, DiffusionHead or None) from a loaded checkpoint, in eval mode, frozen."""
    if ckpt["kind"] == "orthrus-head":
        base, head, _, _ = open_pretrained_head(ckpt, device, dtype)
        return base, head
    base = build_base(ckpt, device, dtype).requires_grad_(False).eval()
    if ckpt["kind"] != "orthrus":
        return base, None
    if state_sha256(ckpt["model"]) != ckpt["base_sha256"]:
        raise UserError("the base weights in this checkpoint are not the ones its head was trained on "
                        f"(sha256 differs from {ckpt['base_sha256'][:12]}...); retrain the head on this base "
                        "with `python train.py --stage head --base-ckpt ...`")
    return base, build_head(ckpt, base, device, dtype)


def build_head(ckpt: dict, base: GPT, device, dtype):
    """The checkpoint's DiffusionHead on `base`, checked and frozen."""
    from diffusion_head import DiffusionHead  # only needed when a head is present

    head_cfg = ckpt["head_config"]
    lens = head_cfg.get("trained_draft_lens")
    if (not isinstance(head_cfg.get("mask_id"), int) or not isinstance(lens, list) or not lens
            or not all(isinstance(k, int) and k >= 2 for k in lens)):
        raise UserError("the checkpoint's head_config needs an integer mask_id and a non-empty list of "
                        f"trained_draft_lens >= 2, got {head_cfg!r}: the file is damaged or was edited")
    if not 0 <= head_cfg["mask_id"] < base.config.vocab_size:
        raise UserError(f"the head's MASK id {head_cfg['mask_id']} is outside the base vocabulary "
                        f"({base.config.vocab_size}): head and base do not belong together")
    head = DiffusionHead(base, head_cfg["mask_id"], head_cfg["trained_draft_lens"])
    _check_state_dict(head, ckpt["head"], "the head's weights do not fit this base")
    head.load_state_dict(ckpt["head"], strict=True)
    return head.to(device=device, dtype=dtype).requires_grad_(False).eval()


def open_pretrained_head(ckpt: dict, device, dtype):
    """(base, head, tokenizer, info) for an "orthrus-head" checkpoint: the base is read from the
    pretrained model it was trained on and must be bit-identical to it (sha256 of the float32 load,
    checked before casting to `dtype`)."""
    from pretrained import load_pretrained

    path = ckpt["base_path"]
    base, _, tokenizer, info = load_pretrained(path, device, torch.float32, mask_id=ckpt["head_config"].get("mask_id"),
                                               expect_base_sha256=ckpt["base_sha256"])
    head = build_head(ckpt, base, device, torch.float32)
    return base.to(dtype=dtype), head.to(dtype=dtype), tokenizer, info


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two tokenizer metas describe the same tokenizer (a pretrained model's BPE by its
    content hash, wherever its file lies; ours by every field)."""
    if a.get("kind") == b.get("kind") == "bpe":
        return a.get("sha256") == b.get("sha256") and a.get("mask_id") == b.get("mask_id")
    return a == b


def open_model(path: str, device="cpu", dtype=torch.float32):
    """(base GPT, DiffusionHead or None, tokenizer, info) from anything the scripts accept as a
    model: one of our .pt checkpoints (base, base+head, or a head for a pretrained base), a Hugging
    Face folder, a .gguf file or an official Orthrus folder. info: "format", "stop_ids" (stop
    after any), "chat" (the tokenizer has a chat format), "data_dir" (our checkpoints' data), and
    "ckpt" (our checkpoints' dict)."""
    from pretrained import is_pretrained_path, load_pretrained

    if path and is_pretrained_path(path):
        return load_pretrained(path, device, dtype)
    ckpt = load_checkpoint(path)
    if ckpt["kind"] == "orthrus-head":
        base, head, tokenizer, info = open_pretrained_head(ckpt, device, dtype)
        info.update(format="orthrus-head", ckpt=ckpt, data_dir=ckpt.get("data_dir"))
        return base, head, tokenizer, info
    base, head = load_model(ckpt, device, dtype)
    tokenizer = load_ckpt_tokenizer(ckpt)
    info = {"format": ckpt["kind"], "stop_ids": [tokenizer.eot_id], "chat": False, "end_of_turn_id": None,
            "data_dir": ckpt.get("data_dir"), "ckpt": ckpt}
    return base, head, tokenizer, info


def tokenizer_model_tensor(tokenizer_meta: dict, data_dir: str):
    """The sentencepiece model file as a uint8 tensor, so checkpoints are self-contained
    (None for byte/tiktoken, which need no file)."""
    if tokenizer_meta.get("kind") != "sentencepiece":
        return None
    path = os.path.join(data_dir, tokenizer_meta["model_file"])
    with open(path, "rb") as f:
        return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)


def load_ckpt_tokenizer(ckpt: dict):
    """The tokenizer a checkpoint was trained with (from the bytes it carries, if any)."""
    from tokenizer import load_tokenizer

    blob = ckpt.get("tokenizer_model")
    model_bytes = None if blob is None else tensor_bytes(blob).tobytes()
    try:
        return load_tokenizer(ckpt["tokenizer"], base_dir=ckpt.get("data_dir"), model_bytes=model_bytes)
    except UserError as e:  # a foreign sentencepiece model, no tiktoken cache: say it was the checkpoint's
        raise UserError(f"the checkpoint's tokenizer cannot be rebuilt ({_summary(e, 160)})") from None


# ---------------------------------------------------------------------------------------------
# Runtime


def set_threads(n: int):
    """Use n CPU threads for torch (0 leaves torch's default: all cores). Decoding a small model
    gains little from a second thread, and two OpenMP threads collapse ~10x whenever another
    process keeps a core busy, so the decoding scripts default to 1."""
    if n > 0:
        torch.set_num_threads(n)


def read_data_meta(data_dir: str) -> dict:
    """meta.json of a folder written by data/prepare.py or data/self_distill.py (the one place it is read)."""
    import json

    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"no {path}: make the folder first (`python data/prepare.py` for a corpus, `python "
                        f"data/self_distill.py` for a model's own answers) or pass the right --data-dir")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:  # bad JSON (a ValueError), unreadable file
        raise UserError(f"{path} is not readable JSON ({type(e).__name__}); run `python data/prepare.py` again") from None
    missing = [k for k in ("dtype", "tokenizer", "vocab_size", "eot_id") if k not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: not written by data/prepare.py; run it again")
    return meta


def fmt_time(seconds: float) -> str:
    """An ETA or a duration: 4m05s, 2h07m."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"

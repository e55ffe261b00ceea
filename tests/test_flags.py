"""Flags that were taken without a word, or answered with a traceback (issue 18): bench's draft
lengths beyond the context, train.py flags that do not apply to the stage, resuming from another
folder, a prompt read from a pipe, bench --suite ar's own flags."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import torch

import bench
from helpers import CPU, ROOT, expect_user_error, load_script, single_thread, train

SHIPPED = os.path.join(ROOT, "checkpoints", "orthrus_stdlib_byte.pt")


# ---------------------------------------------------------------------------------------------
# case 7: bench --draft-lens longer than the context leaves


def test_bench_draft_lens_beyond_the_context(tiny, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def main():\n\nimport os\n")
    for K in (512, 513, 1000):  # the shipped model's context is 512 tokens
        line = expect_user_error(bench.main, ["--ckpt", SHIPPED, "--prompts", prompts, "--draft-lens", K,
                                              "--num-prompts", 1, "--max-new-tokens", 8, "--device", "cpu"], capsys)
        assert line == (f"error: --draft-lens {K} exceeds the 501 positions left in the context after a 11-token "
                        "prompt; use a shorter draft or prompt")
    line = expect_user_error(bench.main, ["--suite", "ablations", "--ckpt", tiny["head"], "--prompt-len", 12,
                                          "--max-new-tokens", 8, "--draft-lens", 4, "--draft-len", 60,
                                          "--device", "cpu"], capsys)
    assert "--draft-len 60 exceeds the 52 positions left in the context after a 12-token prompt" in line
    # the variants whose passes are wider than K: a fused pass carries the next block, a tree its nodes
    small = ["--ckpt", tiny["head"], "--prompt-len", 12, "--max-new-tokens", 8, "--device", "cpu", "--modes", "greedy"]
    line = expect_user_error(bench.main, [*small, "--methods", "ar,orthrus-fused", "--draft-lens", 30], capsys)
    assert "--draft-lens 30 with orthrus-fused needs 60 positions" in line and "more than the 52 left" in line
    line = expect_user_error(bench.main, [*small, "--methods", "ar,orthrus-tree", "--draft-lens", 4,
                                          "--tree-nodes", 60], capsys)
    assert "--tree-nodes 60 needs 61 positions (the tree and its root), more than the 52 left" in line


# ---------------------------------------------------------------------------------------------
# case 15: --prompt-file - (or /dev/stdin) reads the pipe


def test_prompt_file_from_a_pipe(tiny):
    for name in ("-", "/dev/stdin"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", tiny["base"], "--prompt-file",
                            name, "--max-new-tokens", "4", "--device", "cpu"], input="def get_alpha(", text=True,
                           capture_output=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0 and r.stdout.startswith("def get_alpha("), r.stderr
        assert "ar: 4 tokens" in r.stderr


# ---------------------------------------------------------------------------------------------
# case 13: resume from another working folder; the data folder moved


def test_resume_from_another_folder_and_with_moved_data(tiny, tmp_path, monkeypatch, capsys):
    import train as train_script

    parent, name = os.path.split(tiny["data"])
    monkeypatch.chdir(parent)
    out = tmp_path / "run"
    train(["--preset", "tiny", "--max-steps", 2, "--data-dir", name, "--out-dir", out, *CPU])  # relative
    assert torch.load(out / "ckpt.pt", weights_only=True)["train_config"]["data_dir"] == tiny["data"]

    monkeypatch.chdir(tmp_path)  # elsewhere: the stored absolute path still finds the data
    _, log = train(["--resume", "--out-dir", out, "--max-steps", 4, "--device", "cpu"])
    assert "starting at step 2" in log and torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4

    moved = shutil.copytree(tiny["data"], tmp_path / "moved")  # the data moved: --data-dir is honoured
    _, log = train(["--resume", "--out-dir", out, "--max-steps", 6, "--device", "cpu", "--data-dir", "moved"])
    assert f"--data-dir {moved}: the run's data is read from here now (it was {tiny['data']})" in log
    assert "ignored" not in log
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["train_config"]["data_dir"] == str(moved)

    shutil.rmtree(moved)  # gone, and not said where it is now: one line naming the flag
    line = expect_user_error(train_script.main, ["--resume", "--out-dir", out, "--max-steps", 8, "--device", "cpu"],
                             capsys)
    assert line == (f"error: the run's data folder {moved} is not found: pass --data-dir with its place now "
                    "(the same data)")


# ---------------------------------------------------------------------------------------------
# case 10: train.py flags the stage does not use are refused, not dropped


def test_flags_of_the_other_stage_are_refused(tiny, tmp_path, capsys):
    import train as train_script

    base = ["--preset", "tiny", "--data-dir", tiny["data"], "--out-dir", tmp_path / "out", *CPU]
    line = expect_user_error(train_script.main, [*base, "--base-ckpt", tiny["base"]], capsys)
    assert line == ("error: --base-ckpt: head-stage flag, unused by --stage base (which trains a new GPT); to train a "
                    "diffusion head on a base, add --stage head")
    line = expect_user_error(train_script.main, [*base, "--draft-lens", "4", "--grad-checkpoint", "true"], capsys)
    assert line.startswith("error: --draft-lens, --grad-checkpoint: head-stage flags, unused by --stage base")
    line = expect_user_error(train_script.main, ["--stage", "head", *base, "--base-ckpt", tiny["base"],
                                                 "--compile", "true"], capsys)
    assert line == ("error: --compile: base-stage flag, unused by --stage head (it trains without torch.compile); "
                    "drop it")
    assert not (tmp_path / "out").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------
# case 16: bench --suite ar's flags, its thread count, skipped methods, a chat-trained head


def test_bench_suite_ar_flags(tiny, capsys):
    line = expect_user_error(bench.main, ["--suite", "ar", "--ckpt", tiny["base"], "--num-prompts", 3], capsys)
    assert line.startswith("error: --num-prompts is for --suite compare and ablations")
    with single_thread():  # --threads 2 changes torch's global setting; restored afterwards
        results = bench.main(["--suite", "ar", "--ckpt", tiny["base"], "--max-new-tokens", "5", "--repeats", "1",
                              "--threads", "2", "--device", "auto"])
        assert torch.get_num_threads() == 2
    printed = capsys.readouterr().out
    assert "suite ar: 5 new tokens with and without the KV cache, 1 repeat(s), then forward+backward steps of " \
           "4 x 64 tokens" in printed
    assert "### AR decoding to 13 tokens" in printed and "| cache | 5 |" in printed and "cpu, 2 threads" in printed
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert "device: cpu (no accelerator; 2 CPU threads)" in printed  # the count it runs on, not the one before
    assert results["train_tokens_per_s"] > 0


def test_bench_draft_model_without_draft_ckpt(tiny, capsys):
    small = ["--suite", "compare", "--ckpt", tiny["head"], "--device", "cpu", "--prompt-len", 12, "--max-new-tokens",
             8, "--num-prompts", 1, "--repeats", 1, "--modes", "greedy", "--draft-lens", 4]
    results = bench.main([str(a) for a in small])
    assert "note: two-model speculative decoding (draft-model) skipped: it needs --draft-ckpt" in capsys.readouterr().out
    assert not any(r["kind"] == "draft-model" for r in results["greedy"].values())
    line = expect_user_error(bench.main, [*small, "--methods", "ar,draft-model"], capsys)
    assert line.startswith("error: --methods draft-model needs --draft-ckpt PATH")


def test_bench_head_trained_on_self_distilled_data(tiny, tmp_path, capsys):
    """Without --prompts: a head trained on answers to prompts is pointed at the held-out prompts;
    one trained on corpus continuations takes its prompts from that corpus."""
    meta = json.loads(open(os.path.join(tiny["data"], "meta.json")).read())
    prompts = tmp_path / "chat_prompts"
    prompts.mkdir()
    for name, extra in (("answers", {"mode": "prompts", "prompts": str(prompts), "chat": True}),
                        ("continuations", {"source_data_dir": tiny["data"]})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({**meta, "kind": "self-distilled", **extra}))
        ckpt = torch.load(tiny["head"], weights_only=True)
        torch.save({**ckpt, "data_kind": "self-distilled", "data_dir": str(tmp_path / name)}, tmp_path / f"{name}.pt")
    small = ["--device", "cpu", "--prompt-len", 12, "--max-new-tokens", 8, "--num-prompts", 1, "--repeats", 1,
             "--modes", "greedy", "--draft-lens", 4, "--methods", "ar,orthrus"]
    line = expect_user_error(bench.main, ["--ckpt", tmp_path / "answers.pt", *small], capsys)
    assert line.endswith(f"not on a corpus: benchmark it on held-out prompts, --prompts {prompts}/heldout.jsonl --chat")
    assert "data/prepare.py" not in line
    results = bench.main(["--ckpt", str(tmp_path / "continuations.pt"), *map(str, small)])
    assert results["greedy"]["Orthrus K=4"]["identical"] == 1


# ---------------------------------------------------------------------------------------------
# case 18: refusals that came only after the model had loaded; --help's default prompts


def test_refused_before_the_model_loads(tiny, tmp_path, capsys, monkeypatch):
    import sample

    def never(*args, **kwargs):
        raise AssertionError("loaded the model before refusing")

    (tmp_path / "plain.gguf").write_bytes(b"GGUF")  # never read: the name says it has no head
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    monkeypatch.setattr(sample, "open_model", never)
    for path in (tmp_path / "plain.gguf", tmp_path / "hf"):
        line = expect_user_error(sample.main, ["--ckpt", path, "--mode", "compare", "--chat"], capsys)
        assert line.startswith(f"error: --mode compare needs a checkpoint with a diffusion head; {path} is a plain")

    sd = load_script("self_distill")
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"Say number {i}.\n" for i in range(8)))
    argv = ["--prompts", prompts, "--base", tiny["base"], "--out-dir", tmp_path / "self", "--max-new-tokens", 4,
            "--row-len", 16, "--device", "cpu", "--chat", "false"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert sd.main([str(a) for a in argv]) == 0
    monkeypatch.setattr(sd, "open_model", never)
    line = expect_user_error(sd.main, [*argv, "--seed", 6], capsys)
    assert "was made with other settings (seed '1337' there, '6' now)" in line


def test_help_shows_both_default_prompts(capsys):
    import sample

    text = sample.build_parser().format_help()
    assert repr(sample.DEFAULT_PROMPT) in text and "with --chat" in " ".join(text.split())
    assert sample.DEFAULT_CHAT_PROMPT.split()[0] in text

"""Where the scripts' output goes (issue 18): into a pipe whose reader has gone (`| head -1`), into
a folder that cannot be written, into an --out-dir another run is writing. Each is a quiet exit
that keeps the work, or one `error: ...` line with exit code 2."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import CPU, ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# case 1: output into a closed pipe


def run_into_closed_pipe(script, *argv):
    """`python script argv | head -0`: the reader is gone before the first byte is written (a
    reader that stops after one line meets the same BrokenPipeError, only later). Returns
    (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENV, cwd=ROOT, text=True)
    proc.stdout.close()  # the only read end: every write to the child's stdout now fails with EPIPE
    err = proc.stderr.read()
    proc.stderr.close()
    return proc.wait(timeout=120), err


def assert_quiet(rc, err):
    assert rc == 0, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err


def test_closed_pipe_sample_compare_and_trace(tiny):
    rc, err = run_into_closed_pipe("sample.py", "--ckpt", tiny["head"], "--prompt", "def ", "--max-new-tokens", 40,
                                   "--mode", "compare", "--trace", "--device", "cpu")
    assert_quiet(rc, err)
    assert "outputs: IDENTICAL" in err  # the job ran to its end; only stdout was dropped


def test_closed_pipe_bench_still_writes_its_json(tiny, tmp_path):
    out = tmp_path / "b.json"
    rc, err = run_into_closed_pipe("bench.py", "--suite", "compare", "--ckpt", tiny["head"], "--device", "cpu",
                                   "--prompt-len", 12, "--max-new-tokens", 12, "--num-prompts", 1, "--repeats", 1,
                                   "--modes", "greedy", "--methods", "ar,orthrus", "--draft-lens", 4, "--json", out)
    assert_quiet(rc, err)
    assert "AR (KV cache)" in json.loads(out.read_text())["greedy"]


def test_closed_pipe_train_saves_its_checkpoint(tiny, tmp_path):
    rc, err = run_into_closed_pipe("train.py", "--preset", "tiny", "--max-steps", 4, "--data-dir", tiny["data"],
                                   "--out-dir", tmp_path / "base", *CPU)
    assert_quiet(rc, err)
    assert torch.load(tmp_path / "base" / "ckpt.pt", weights_only=True)["step"] == 4


def test_closed_pipe_self_distill_and_prepare_write_their_files(tiny, tmp_path):
    rc, err = run_into_closed_pipe("data/self_distill.py", "--base-ckpt", tiny["base"], "--data-dir", tiny["data"],
                                   "--out-dir", tmp_path / "self", "--tokens", 128, "--batch-size", 1, "--device", "cpu")
    assert_quiet(rc, err)
    assert json.loads((tmp_path / "self" / "meta.json").read_text())["n_rows"] == 2
    rc, err = run_into_closed_pipe("data/prepare.py", "--input", tiny["text"], "--out-dir", tmp_path / "data")
    assert_quiet(rc, err)
    assert os.path.isfile(tmp_path / "data" / "meta.json") and os.path.isfile(tmp_path / "data" / "train.bin")

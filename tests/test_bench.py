"""bench.py runs end to end on the session's tiny checkpoints (a smoke test: it checks that the
tables and JSON are produced and self-consistent, never timings)."""

import json

import pytest

import bench
from helpers import expect_user_error




def test_orthrus_suite_tables_and_json(tiny, tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = bench.main(["--suite", "orthrus", "--ckpt", tiny["head"], "--device", "cpu", "--prompt-len", "12",
                          "--max-new-tokens", "20", "--num-prompts", "2", "--repeats", "1", "--draft-lens", "4,6",
                          "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| K | tokens/cycle |" in printed and "### Sampling" in printed
    saved = json.loads(out.read_text())
    assert set(saved["greedy"]) == {"4", "6"}
    for K, row in results["greedy"].items():
        assert row["identical"] == 2  # greedy Orthrus == greedy AR on every prompt
        assert 1.0 <= row["tokens_per_cycle"] <= K
        assert row["tokens_per_forward"] == pytest.approx(row["tokens_per_cycle"] / 2, rel=1e-6)
    assert 0 < results["trainable_fraction"] < 1


def test_ar_suite_runs(tiny, capsys):
    results = bench.main(["--suite", "ar", "--ckpt", tiny["base"], "--device", "cpu", "--repeats", "1"])
    assert results["decode_tokens_per_s"]["cache"] > 0 and results["train_tokens_per_s"] > 0


def test_bench_bad_input(tiny, capsys):
    line = expect_user_error(bench.main, ["--suite", "orthrus", "--ckpt", tiny["base"], "--device", "cpu"], capsys)
    assert "no diffusion head" in line
    line = expect_user_error(bench.main, ["--suite", "orthrus", "--ckpt", tiny["head"], "--device", "cpu",
                                          "--draft-lens", "1,4", "--prompt-len", "8"], capsys)
    assert "draft lengths must be >= 2" in line

"""bench.py runs end to end on the session's tiny checkpoints (a smoke test: it checks that the
tables and JSON are produced and self-consistent, never timings)."""

import json

import pytest
import torch

import bench
import benchmarks.gpu_check as gpu_check
import benchmarks.suites
from helpers import expect_user_error




SMALL = ["--device", "cpu", "--prompt-len", "12", "--max-new-tokens", "20", "--num-prompts", "2", "--repeats", "1"]


def test_compare_suite_tables_and_json(tiny, tmp_path, capsys):
    """All four methods on the tiny base; the tiny base doubles as its own draft model (an oracle:
    every draft accepted), which checks the draft-model rows' bookkeeping."""
    out = tmp_path / "bench.json"
    results = bench.main(["--suite", "compare", "--ckpt", tiny["head"], "--draft-ckpt", tiny["base"], *SMALL,
                          "--draft-lens", "4,6", "--gammas", "3", "--lookup-gammas", "4", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| method | tokens/cycle |" in printed and "### Sampling" in printed and "### Orthrus detail" in printed
    saved = json.loads(out.read_text())
    assert set(saved["greedy"]) == {"AR (KV cache)", "Orthrus K=4", "Orthrus K=6", "draft model gamma=3",
                                    "prompt lookup gamma=4"}
    for mode in ("greedy", "sampling"):
        rows = results[mode]
        assert rows["AR (KV cache)"]["tokens_per_cycle"] == 1.0
        for label, row in rows.items():
            if mode == "greedy":
                assert row["identical"] == 2, label  # every method reproduces greedy AR exactly
            if row["kind"] == "orthrus":
                assert 1.0 <= row["tokens_per_cycle"] <= row["param"]
                # two passes per cycle (draft + verify), except a last cycle with room for one token,
                # which drafts nothing: at most one such cycle per prompt
                assert 0 <= 2 * row["cycles"] - row["forward_passes"] <= row["prompts"]
                assert row["tokens_per_forward"] == pytest.approx(
                    row["tokens_per_cycle"] * row["cycles"] / row["forward_passes"], rel=1e-9)
                assert row["extra_persistent_bytes"] == 0
        assert rows["draft model gamma=3"]["extra_persistent_bytes"] > 0  # its own cache
    # greedy with the base as its own drafter accepts all gamma drafts: gamma + 1 per cycle
    # (except a final cycle trimmed by max_new_tokens)
    assert results["greedy"]["draft model gamma=3"]["tokens_per_cycle"] > 3.0
    assert 0 < results["trainable_fraction"] < 1


def test_compare_suite_tree_and_fused_rows(tiny, capsys):
    """Token trees (greedy only) and the fused pass run beside the chain, stay identical to AR, and
    every row reports its cycle's passes in AR steps."""
    results = bench.main(["--suite", "compare", "--ckpt", tiny["head"], *SMALL, "--draft-lens", "4",
                          "--methods", "orthrus,orthrus-tree,orthrus-fused", "--tree-nodes", "6", "--tree-width", "3"])
    printed = capsys.readouterr().out
    assert "cycle's passes in AR steps" in printed
    greedy, sampled = results["greedy"], results["sampling"]
    assert set(greedy) == {"AR (KV cache)", "Orthrus K=4", "Orthrus tree K=4 n=6 w=3", "Orthrus fused K=4"}
    assert "Orthrus tree K=4 n=6 w=3" not in sampled  # sampled decoding drafts chains
    for row in greedy.values():
        assert row["identical"] == row["prompts"] and row["cycle_in_steps"] > 0
    assert greedy["Orthrus fused K=4"]["forward_passes"] < 2 * greedy["Orthrus fused K=4"]["cycles"]


def test_ablations_suite(tiny, capsys):
    results = bench.main(["--suite", "ablations", "--ckpt", tiny["head"], "--draft-ckpt", tiny["base"], *SMALL,
                          "--ablation-k", "4", "--draft-lens", "4", "--heads", f"again={tiny['head']}",
                          "--prompt-lens", "8,40,60", "--tokenizer-ckpts", f"byte={tiny['head']}"])
    printed = capsys.readouterr().out
    for title in ("Denoising steps", "Head training variants", "Prompt length", "Memory beyond", "Tokenizers"):
        assert title in printed
    assert set(results["denoise"]) == {1, 2, 4}
    assert set(results["prompt_length"]) == {8, 40}  # 60 + 16 new tokens would pass the 64-token context
    memory = results["memory"]
    assert all(row["draft_model_kv"] > 0 for row in memory.values())
    assert memory[128]["draft_model_kv"] == 2 * memory[64]["draft_model_kv"]  # grows with the context
    assert results["tokenizer"]["byte"]["chars_per_token"] > 0


def test_ar_suite_runs(tiny, capsys):
    results = bench.main(["--suite", "ar", "--ckpt", tiny["base"], "--device", "cpu", "--repeats", "1"])
    assert results["decode_tokens_per_s"]["cache"] > 0 and results["train_tokens_per_s"] > 0


def test_bench_bad_input(tiny, tmp_path, capsys):
    def error(*argv):
        return expect_user_error(bench.main, ["--device", "cpu", "--prompt-len", "8", "--max-new-tokens", "8", *argv], capsys)

    assert "no diffusion head" in error("--ckpt", tiny["base"])
    assert "--draft-lens must be >= 2" in error("--ckpt", tiny["head"], "--draft-lens", "1,4")
    assert "unknown --methods" in error("--ckpt", tiny["head"], "--methods", "orthrus,medusa")
    assert "exceeds the model's context of 64" in error("--ckpt", tiny["head"], "--prompt-len", "60")
    assert "--max-new-tokens must be >= 1" in error("--ckpt", tiny["head"], "--max-new-tokens", "0")
    other = torch.load(tiny["base"], weights_only=True)
    other["tokenizer"] = {**other["tokenizer"], "kind": "sentencepiece", "vocab_size": 512}
    torch.save(other, tmp_path / "other.pt")
    assert "uses another tokenizer" in error("--ckpt", tiny["head"], "--draft-ckpt", tmp_path / "other.pt")


def test_bench_checks_flags_before_loading(tiny, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("loaded a model before checking every flag")

    monkeypatch.setattr(benchmarks.suites, "open_model", never)
    for flags, message in ((["--methods", "orthrus,medusa"], "unknown --methods"), (["--modes", "fast"], "unknown --modes"),
                           (["--gammas", "0"], "--gammas values must be >= 1"), (["--heads", "nolabel"], "label=path"),
                           (["--json", str(tmp_path / "missing" / "r.json")], "cannot write into")):
        assert message in expect_user_error(bench.main, ["--ckpt", tiny["head"], "--device", "cpu", *flags], capsys)


def test_bench_one_new_token(tiny, capsys):
    """With one new token there are no cycles: the tables still print (n/a where nothing drafted)."""
    results = bench.main(["--suite", "compare", "--ckpt", tiny["head"], *SMALL[:4], "--max-new-tokens", "1",
                          "--num-prompts", "1", "--repeats", "1", "--modes", "greedy", "--draft-lens", "4"])
    assert results["greedy"]["Orthrus K=4"]["accepted_mean"] is None


def test_gpu_check_runs_on_a_cpu(capsys):
    """benchmarks/gpu_check.py is prepared for a lent GPU; on a CPU with --small it runs the same
    exactness checks and table in seconds, so it is known to work before a GPU is there."""
    code = gpu_check.main(["--device", "cpu", "--small", "--dtype", "float32", "--max-new-tokens", "32",
                           "--repeats", "1"])
    printed = capsys.readouterr().out
    assert code == 0 and "all exactness checks passed" in printed and "FAIL" not in printed
    assert "| fused K=16 | 15." in printed  # acceptance forced: every cycle commits K tokens

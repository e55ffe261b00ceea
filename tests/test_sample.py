"""sample.py end to end on the session's tiny base and base+head checkpoints (helpers.tiny_run):
every mode runs, greedy Orthrus equals greedy AR, sampling is reproducible from --seed, decoding
stops cleanly at the context limit and says so, and every user mistake is one `error:` line with
exit code 2, never a traceback."""

import os
import subprocess
import sys

import pytest
import torch

import sample
from helpers import ROOT, expect_user_error

CONTEXT = 64  # context_len of the tiny preset




def run(capsys, *argv):
    """sample.main in-process; returns (its result, stdout, stderr)."""
    capsys.readouterr()
    result = sample.main(["--device", "cpu", *map(str, argv)])
    out = capsys.readouterr()
    return result, out.out, out.err


# ---------------------------------------------------------------------------------------------
# it runs


def test_ar_mode(tiny, capsys):
    stats, out, err = run(capsys, "--ckpt", tiny["head"], "--mode", "ar", "--prompt", "def ", "--max-new-tokens", 20)
    assert stats.method == "ar" and stats.new_tokens == 20 and stats.stop_reason == "max_new_tokens"
    assert out.startswith("def ") and len(out) > len("def \n")
    assert "ar: 20 tokens in" in err


def test_orthrus_mode_is_the_default_with_a_head(tiny, capsys):
    stats, out, err = run(capsys, "--ckpt", tiny["head"], "--prompt", "def ", "--max-new-tokens", 20, "--draft-len", 6)
    assert stats.method == "orthrus" and stats.new_tokens == 20
    assert out.startswith("def ")
    assert "tokens/cycle" in err and "memory: the head adds only one draft block" in err


def test_prompt_file_gives_the_same_text_as_prompt(tiny, capsys, tmp_path):
    (tmp_path / "p.txt").write_text("def ", encoding="utf-8")
    _, from_flag, _ = run(capsys, "--ckpt", tiny["head"], "--prompt", "def ", "--max-new-tokens", 10)
    _, from_file, _ = run(capsys, "--ckpt", tiny["head"], "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", 10)
    assert from_flag == from_file


def test_compare_greedy_is_identical(tiny, capsys):
    """float64: greedy Orthrus equals greedy AR exactly; in float32 a near-tie between the
    one-token and the block forward may flip (sample.py then says DIFFERENT, by design)."""
    (ar, o), out, err = run(capsys, "--ckpt", tiny["head"], "--mode", "compare", "--prompt", "def ",
                            "--max-new-tokens", 30, "--draft-len", 4, "--dtype", "float64")
    assert "outputs: IDENTICAL (30 vs 30 tokens)" in err
    assert "--- AR ---" in err and "--- Orthrus ---" in err and "speedup:" in err
    half = len(out) // 2  # stdout: the AR text, then the Orthrus text, each prompt + output + newline
    assert out[:half] == out[half:] and out.startswith("def "), out
    assert o.method == "orthrus" and sum(o.accepted_per_cycle) > 0  # the drafts were used, not just verified


def test_trace_plain_markers_when_not_a_tty(tiny, capsys):
    stats, out, err = run(capsys, "--ckpt", tiny["head"], "--prompt", "def ", "--max-new-tokens", 12,
                          "--draft-len", 4, "--trace")
    cycles = [line for line in err.splitlines() if line.startswith("cycle ")]
    assert len(cycles) == stats.cycles > 0
    assert all("[ok:" in c and "][x:" in c and "][+:" in c for c in cycles), err
    assert "\033" not in err and "\033" not in out  # no colour codes into a file or pipe
    assert out.startswith("def ")


@pytest.mark.parametrize("mode", ["orthrus", "ar"])
def test_sampling_is_reproducible_from_the_seed(tiny, capsys, mode):
    argv = ["--ckpt", tiny["head"], "--mode", mode, "--prompt", "def ", "--max-new-tokens", 24,
            "--temperature", 0.8, "--top-k", 5, "--seed", 1, "--draft-len", 4]
    _, first, _ = run(capsys, *argv)
    _, second, _ = run(capsys, *argv)
    assert first == second and first.startswith("def ")


@pytest.mark.parametrize("mode", ["orthrus", "ar"])
def test_stops_cleanly_at_the_context_limit(tiny, capsys, mode):
    stats, out, err = run(capsys, "--ckpt", tiny["head"], "--mode", mode, "--prompt", "def ",
                          "--max-new-tokens", 100, "--draft-len", 6)
    assert stats.new_tokens == CONTEXT - len("def ") and stats.stop_reason == "context_limit"
    assert "stopped at the context limit" in err


def test_base_only_checkpoint_runs_ar(tiny, capsys):
    stats, out, err = run(capsys, "--ckpt", tiny["base"], "--prompt", "def ", "--max-new-tokens", 8)
    assert stats.method == "ar" and stats.new_tokens == 8 and out.startswith("def ")
    # asking for Orthrus explicitly falls back to AR with a note
    stats, _, err = run(capsys, "--ckpt", tiny["base"], "--mode", "orthrus", "--prompt", "def ", "--max-new-tokens", 8)
    assert stats.method == "ar" and "note: this checkpoint has no diffusion head; running plain AR decoding" in err


def test_base_only_checkpoint_with_default_mode_says_it_runs_ar(tiny, capsys):
    stats, out, err = run(capsys, "--ckpt", tiny["base"], "--prompt", "def ", "--max-new-tokens", 8)
    assert stats.method == "ar"
    assert "note: this checkpoint has no diffusion head; running plain AR decoding" in err


def test_command_line_runs(tiny):
    """The real `python sample.py`, no stdin, output to a pipe."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", tiny["head"], "--prompt", "def ",
                        "--max-new-tokens", "8", "--mode", "compare", "--dtype", "float64", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "outputs: IDENTICAL" in r.stderr, r.stderr


def test_command_line_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(tmp_path / "nope.pt")],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "not found" in lines[0], r.stderr


# ---------------------------------------------------------------------------------------------
# bad input: one line, exit code 2


def _bad_checkpoints(tmp_path, head_ckpt=None):
    (tmp_path / "random.pt").write_bytes(os.urandom(1000))
    if head_ckpt is not None:
        from checkpoint import state_sha256

        # the head travels with a base that is not the one it was trained on (hash mismatch)
        ck = torch.load(head_ckpt, weights_only=True)
        ck["model"] = {k: v + 1e-3 for k, v in ck["model"].items()}
        torch.save(ck, tmp_path / "wrong_base.pt")
        # a base with a different (smaller) vocabulary, consistently hashed: the head's MASK id no longer exists
        ck = torch.load(head_ckpt, weights_only=True)
        ck["model"]["embed_tokens.weight"] = ck["model"]["embed_tokens.weight"][:200].clone()
        ck["model"]["lm_head.weight"] = ck["model"]["embed_tokens.weight"]  # tied
        ck["model_config"]["vocab_size"] = 200
        ck["base_sha256"] = state_sha256(ck["model"])
        torch.save(ck, tmp_path / "other_vocab.pt")
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, tmp_path / "foreign.pt")
    (tmp_path / "folder").mkdir()


SAMPLE_ERRORS = [
    # (id, ckpt: head/base/a file made by _bad_checkpoints, extra flags, message)
    ("missing_ckpt", "nope.pt", [], "not found"),
    ("folder_as_ckpt", "folder", [], "is a folder"),
    ("random_bytes", "random.pt", [], "is not a readable orthrus checkpoint"),
    ("dict_without_kind", "foreign.pt", [], "is not an orthrus checkpoint"),
    ("head_with_wrong_base", "wrong_base.pt", [], "not the ones its head was trained on"),
    ("head_with_other_vocab", "other_vocab.pt", [], "outside the base vocabulary"),
    ("empty_prompt", "head", ["--prompt", ""], "the prompt encodes to zero tokens"),
    ("long_prompt_ar", "head", ["--mode", "ar", "--prompt", "x" * 100], "the prompt is 100 tokens but the context holds 64"),
    ("lone_surrogate", "head", ["--prompt", "def \udc80"], "cannot encode character '\\udc80'"),
    ("negative_temperature", "head", ["--temperature", "-1"], "temperature must be a finite number >= 0"),
    ("top_p_0", "head", ["--top-p", "0", "--temperature", "1"], "top_p must be in (0, 1]"),
    ("top_p_1.5", "head", ["--top-p", "1.5", "--temperature", "1"], "top_p must be in (0, 1]"),
    ("negative_top_k", "head", ["--top-k", "-1", "--temperature", "1"], "top_k must be an integer >= 0"),
    ("draft_len_1", "head", ["--draft-len", "1"], "--draft-len must be >= 2"),
    ("tiny_temperature", "head", ["--temperature", "1e-40"], "too small to sample with"),
    ("tiniest_temperature", "head", ["--temperature", "1e-320"], "too small to sample with"),
    ("huge_seed", "head", ["--seed", str(2**64)], "--seed must be in [0, 2**63)"),
    ("negative_threads", "head", ["--threads", "-1"], "--threads must be >= 0"),
    ("prompt_file_is_a_folder", "head", ["--prompt-file", "{tmp}/folder"], "is a directory"),
    ("draft_len_past_context", "head", ["--prompt", "x" * 60, "--draft-len", "16"], "exceeds the 4 positions left"),
    ("zero_new_tokens", "head", ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ("zero_denoise_steps", "head", ["--denoise-steps", "0"], "denoise-steps must be >= 1"),
    ("compare_without_head", "base", ["--mode", "compare"], "needs a checkpoint with a diffusion head"),
    ("prompt_and_prompt_file", "head", ["--prompt", "a", "--prompt-file", "p.txt"], "not both"),
    ("missing_prompt_file", "head", ["--prompt-file", "{tmp}/none.txt"], "not found"),
]


@pytest.mark.parametrize("ckpt,flags,message", [e[1:] for e in SAMPLE_ERRORS], ids=[e[0] for e in SAMPLE_ERRORS])
def test_bad_input(tiny, tmp_path, capsys, ckpt, flags, message):
    _bad_checkpoints(tmp_path, tiny["head"])
    ckpt = tiny.get(ckpt) or str(tmp_path / ckpt)
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    line = expect_user_error(sample.main, ["--device", "cpu", "--ckpt", ckpt, "--max-new-tokens", 4,
                                           "--draft-len", 6, *flags], capsys)
    assert message in line


def test_draft_len_beyond_training_is_allowed_with_a_warning(tiny, capsys):
    sample.main(["--device", "cpu", "--ckpt", tiny["head"], "--prompt", "def ", "--max-new-tokens", "8",
                 "--draft-len", "9"])  # the tiny head was trained with K in {4, 6}
    err = capsys.readouterr().err
    assert "warning: --draft-len 9 is longer than the head was trained for (max 6)" in err


@pytest.mark.parametrize("flags", [["--max-new-tokens", "0"], ["--seed", str(2**64)], ["--temperature", "1e-40"],
                                   ["--draft-len", "1"], ["--denoise-steps", "0"]])
def test_flags_are_checked_before_loading_anything(flags, capsys, monkeypatch):
    """A bad flag is reported before the (possibly slow) checkpoint load even starts."""
    def no_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the flags were checked")

    monkeypatch.setattr(sample, "open_model", no_load)
    expect_user_error(sample.main, ["--device", "cpu", "--ckpt", "any.pt", *flags], capsys)


def test_default_draft_len_shortens_itself_for_a_long_prompt(tiny, capsys):
    """Without --draft-len, a prompt that leaves fewer positions than the default block still
    decodes (the decoder shortens the last blocks); only an explicit impossible value is an error."""
    stats, out, err = run(capsys, "--ckpt", tiny["head"], "--prompt", "x" * 60, "--max-new-tokens", 4)
    assert stats.method == "orthrus" and stats.new_tokens == 4


def test_default_prompt_shows_text(tiny, capsys):
    stats, out, err = run(capsys, "--ckpt", tiny["head"], "--max-new-tokens", 8)
    assert out.startswith(sample.DEFAULT_PROMPT) and out.strip() != ""


def test_internal_error_is_not_disguised_as_a_user_mistake(tiny, capsys, monkeypatch):
    """A defect in our own code (here: a KV-cache overflow) keeps its traceback; run_cli does not
    turn it into a one-line `error:` with exit code 2."""
    from cli import run_cli
    from model import GPT

    def broken_cache(self, batch_size=1, capacity=None):
        return original(self, batch_size, 2)

    original = GPT.new_cache
    monkeypatch.setattr(GPT, "new_cache", broken_cache)
    with pytest.raises(RuntimeError, match="KV cache overflow"):
        run_cli(sample.main, ["--device", "cpu", "--ckpt", tiny["head"], "--prompt", "def ", "--max-new-tokens", "4"])


def test_too_long_prompt_in_orthrus_mode_blames_the_prompt(tiny, capsys):
    line = expect_user_error(sample.main, ["--device", "cpu", "--ckpt", tiny["head"], "--prompt", "x" * 100], capsys)
    assert "the prompt is 100 tokens but the context holds 64" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tiny, capsys):
    line = expect_user_error(sample.main, ["--ckpt", tiny["head"], "--device", "cuda"], capsys)
    assert "CUDA is not available" in line

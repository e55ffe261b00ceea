"""train.py end to end on a tiny made-up corpus (CPU, seconds): training lowers the loss, an
interrupted run resumes bit-identically, checkpoints are plain data written atomically, the head
stage leaves its frozen base bit-identical, and every user mistake is one `error:` line with exit
code 2. The tiny base and head are trained once per session (helpers.tiny_run)."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import cli
import export
import pretrained
import train as train_script
from checkpoint import load_checkpoint, load_model, save_checkpoint, state_sha256, unpack_head
from diffusion_head import DiffusionHead
from cli import run_cli
from helpers import CPU, ROOT, expect_user_error, load_script, prepare_data, train, write_corpus
from model import GPT, GPTConfig
from tokenizer import ByteTokenizer, load_tokens




# ---------------------------------------------------------------------------------------------
# helpers


def assert_plain(obj, where="ckpt"):
    """Only what torch.load(weights_only=True) accepts and a reader expects: dicts, lists, str,
    numbers, None, tensors; no `_orig_mod.` keys from a compiled module."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, (str, int)), f"{where}: key {k!r}"
            assert "_orig_mod." not in str(k), f"{where}: compiled-module key {k!r}"
            assert_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            assert_plain(v, f"{where}[{i}]")
    else:
        assert obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor)), f"{where}: {type(obj)}"


def assert_identical(a, b, where="ckpt"):
    """Equal structure, and every tensor equal bit for bit (torch.equal, same dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def val_loss(model, data_dir, n_windows=16, length=65):
    """Mean next-token cross-entropy over fixed val windows (the same for every model)."""
    val = load_tokens(os.path.join(data_dir, "val.bin"), "uint16").long()
    starts = torch.linspace(0, val.numel() - length - 1, n_windows).long().tolist()
    idx = torch.stack([val[s : s + length] for s in starts])
    logits = model(idx[:, :-1], logits="all")
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1)).item()


def interrupt_at(monkeypatch, at_step):
    """Make Ctrl-C arrive at the start of optimizer step `at_step` (0-based)."""
    real = train_script.lr_at

    def lr_at(step, cfg):
        if step == at_step:
            raise KeyboardInterrupt
        return real(step, cfg)

    monkeypatch.setattr(train_script, "lr_at", lr_at)


# ---------------------------------------------------------------------------------------------
# base stage


def test_tiny_training_lowers_the_loss(tiny):
    evals = [(int(s), float(v)) for s, v in re.findall(r"eval step (\d+): val loss ([\d.]+)", tiny["base_log"])]
    assert [s for s, _ in evals] == [10, 20], tiny["base_log"]  # every eval_interval, and the final one
    assert evals[1][1] < evals[0][1]
    ckpt = load(tiny["base"])
    assert ckpt["step"] == 20 and abs(ckpt["val_loss"] - evals[-1][1]) < 1e-4  # the saved model is the evaluated one
    trained = GPT(GPTConfig(**ckpt["model_config"]))
    trained.load_state_dict(ckpt["model"])
    with torch.random.fork_rng():  # an untrained model of the same shape, without touching global RNG state
        torch.manual_seed(0)
        untrained = GPT(GPTConfig(**ckpt["model_config"]))
    # untrained: ~ln(258) = 5.55 nats; 20 steps on this repetitive text reach ~4. 0.5 nats of margin.
    assert val_loss(trained, tiny["data"]) < val_loss(untrained, tiny["data"]) - 0.5
    # the fixed-field progress line (STYLE habit 14)
    assert re.search(r"step +20/20 \| loss [\d.]+ \(ema [\d.]+\) \| lr [\d.e+-]+ \| ", tiny["base_log"])


def test_interrupted_run_resumes_bit_identically(tiny, tmp_path, monkeypatch, capsys):
    """The shared tiny base is the uninterrupted 20-step run. Here the same run is stopped by
    Ctrl-C at step 13 (three steps after the step-10 checkpoint, so those steps are lost) and then
    resumed with --resume: model, optimizer state, data RNG and step must equal the straight run's."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, 13)
        with pytest.raises(SystemExit) as exc:
            train_script.main([str(a) for a in ["--preset", "tiny", "--data-dir", tiny["data"], "--out-dir", out, *CPU]])
    assert exc.value.code == 130
    printed = capsys.readouterr().out
    assert "interrupted at step 13" in printed
    assert f"{out / 'ckpt.pt'} (step 10), is intact" in printed and "--resume" in printed
    assert load(out / "ckpt.pt")["step"] == 10

    _, log = train(["--resume", "--out-dir", out, "--device", "cpu"])
    assert "starting at step 10" in log
    straight, resumed = load(tiny["base"]), load(out / "ckpt.pt")
    for key in ("model", "optimizer", "data_rng", "step", "model_config", "val_loss", "tokenizer"):
        assert_identical(straight[key], resumed[key], key)

    # resuming a finished run does nothing
    _, log = train(["--resume", "--out-dir", out, "--device", "cpu"])
    assert "nothing to do" in log


def test_checkpoints_are_plain_data(tiny):
    for path, kind in ((tiny["base"], "orthrus-base"), (tiny["head"], "orthrus")):
        ckpt = load(path)  # weights_only=True: no pickled code
        assert ckpt["kind"] == kind
        assert_plain(ckpt)
        assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]  # no temp file left behind


def test_crash_during_save_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    shutil.copy(tiny["base"], path)
    before = load_checkpoint(path)
    real_save = torch.save

    def half_then_crash(obj, f, *args, **kwargs):  # writes half the file, then the disk is full
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", half_then_crash)
        with pytest.raises(OSError):
            save_checkpoint({**before, "step": 999}, path)
    after = load_checkpoint(path)
    assert after["step"] == before["step"]
    assert_identical(before["model"], after["model"])
    # the next save succeeds, replaces the file and leaves no temp file
    save_checkpoint({**before, "step": 21}, path)
    assert load_checkpoint(path)["step"] == 21
    assert os.listdir(tmp_path) == ["ckpt.pt"]


BASE_ERRORS = [
    (["--data-dir", "{tmp}/missing"], "data/prepare.py"),
    (["--n-head", "4", "--n-kv-head", "3"], "must divide n_head"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge' (choose from 'cpu', 'draft', 'gpu', 'tiny')"),
    (["--stage", "head", "--preset", "draft", "--base-ckpt", "x"], "unknown --preset 'draft' for stage head"),
    (["--stage", "middle"], "argument --stage: invalid choice: 'middle' (choose from 'base', 'head')"),
    (["--seq-len", "100"], "exceeds the model's --context-len 64"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--resume"], "not found"),
    # values that trained on NaN, ran gradient ascent or printed negative speeds (issue 8)
    (["--rms-norm-eps", "-1"], "rms_norm_eps (--rms-norm-eps) must be a finite number > 0, got -1.0"),
    (["--rope-theta", "0"], "rope_theta (--rope-theta) must be a finite number > 0"),
    (["--loss-position-decay", "-1"], "--loss-position-decay must be a finite number >= 0 (0 = uniform), got -1.0"),
    (["--seq-len", "-5"], "--seq-len must be an integer >= 0, got -5"),
    (["--min-lr-ratio", "-5"], "--min-lr-ratio must be in [0, 1]"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number >= 0 (0 = off), got nan"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--beta2", "1"], "--beta2 must be in [0, 1)"),
    (["--warmup-steps", "-1"], "--warmup-steps must be an integer >= 0"),
    (["--seed", str(10**23)], "--seed must be below 2**63"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["--device", "meta"], "available here: auto, cpu"),
    (["--device", "nonsense"], "unknown --device 'nonsense'"),
    (["--out-dir", "{file}"], "is a file; pass a folder"),
]


@pytest.mark.parametrize("flags,message", BASE_ERRORS, ids=[m for _, m in BASE_ERRORS])
def test_base_stage_bad_input(tiny, tmp_path, capsys, flags, message):
    (tmp_path / "a_file").write_text("not a folder")
    flags = [f.replace("{tmp}", str(tmp_path)).replace("{file}", str(tmp_path / "a_file")) for f in flags]
    argv = ["--preset", "tiny", "--data-dir", tiny["data"], "--out-dir", tmp_path / "out", *CPU, *flags]
    if "--preset" in flags:
        argv = argv[2:]
    assert message in expect_user_error(train_script.main, argv, capsys)


def test_flags_are_checked_before_anything_is_read(tiny, tmp_path, capsys, monkeypatch):
    """A bad flag is reported before data, base checkpoints or models are touched: no waiting for
    a load to learn about a typo, and the flag's own message rather than a follow-on error."""
    def never(*args, **kwargs):
        raise AssertionError("loaded something before checking every flag")

    for name in ("TokenData", "load_data", "load_checkpoint", "GPT", "DiffusionHead"):
        monkeypatch.setattr(train_script, name, never)
    head = ["--stage", "head", "--preset", "tiny", "--data-dir", tiny["data"], "--base-ckpt", tiny["base"],
            "--out-dir", tmp_path / "h", *CPU]
    for extra, message in ((["--loss", "mse"], "invalid choice: 'mse' (choose from 'kl', 'ce')"),
                           (["--anchors", "x"], "argument --anchors: invalid choice"),
                           (["--draft-lens", "4,x"], "comma list of integers"),
                           (["--seq-len", "16", "--draft-lens", "4,9"], "too long for training sequences of 16"),
                           (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
                           (["--n-layer", "3"], "--n-layer: model flags apply to --stage base only"),
                           (["--device", "cuda:7"], "--device cuda:7")):
        if extra[:2] == ["--device", "cuda:7"] and "cuda:7" in cli.available_devices():
            continue
        assert message in expect_user_error(train_script.main, head + extra, capsys)
    base = ["--preset", "tiny", "--data-dir", tmp_path / "missing", "--out-dir", tmp_path / "b", *CPU]
    assert "--lr must be" in expect_user_error(train_script.main, base + ["--lr", "-1"], capsys)


def test_help_shows_meaningful_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        train_script.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: )" not in text and "default: )" not in text
    assert "(default: out/base or out/head)" in text and "(default: 0.001)" in text and "(default: 8,16,32)" in text
    assert "the cosine schedule then runs to the new --max-steps" in text


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    """From step 12 on the learning rate is absurd: the run must stop with one line, exit 2, and
    leave the step-10 checkpoint byte-identical (the NaN state is never saved)."""
    out = tmp_path / "run"
    argv = ["--preset", "tiny", "--data-dir", tiny["data"], "--out-dir", out, *CPU]
    real = train_script.lr_at
    snapshot = {}

    def lr_at(step, cfg):
        if step == 12 and not snapshot:
            snapshot["bytes"] = (out / "ckpt.pt").read_bytes()
        return 1e9 if step >= 12 else real(step, cfg)

    monkeypatch.setattr(train_script, "lr_at", lr_at)
    line = expect_user_error(train_script.main, argv, capsys)
    assert "the run diverged" in line and "lower --lr" in line and f"{out / 'ckpt.pt'} (step 10), is intact" in line
    assert (out / "ckpt.pt").read_bytes() == snapshot["bytes"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_lr_1e9_exits_2_without_writing_nan_weights(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    line = expect_user_error(train_script.main, ["--preset", "tiny", "--data-dir", tiny["data"], "--out-dir", out,
                                                 "--lr", "1e9", *CPU], capsys)
    assert "diverged" in line and "no checkpoint of this run was written" in line
    assert not (out / "ckpt.pt").exists()


def test_ctrl_c_during_start_up_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    """Ctrl-C while the head stage loads its base: run_cli's one line and exit code 130."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_script, "load_checkpoint", interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(train_script.main, [str(a) for a in ["--stage", "head", "--preset", "tiny", "--data-dir", tiny["data"],
                                                     "--base-ckpt", tiny["base"], "--out-dir", tmp_path / "h", *CPU]])
    captured = capsys.readouterr()
    assert exc.value.code == 130
    assert captured.err.strip() == "interrupted" and "Traceback" not in captured.err + captured.out


def test_resume_extends_max_steps_and_reports_ignored_flags(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(tiny["base"], out / "ckpt.pt")  # a finished 20-step run
    saved_seed = load(out / "ckpt.pt")["train_config"]["seed"]
    _, log = train(["--resume", "--out-dir", out, "--device", "cpu", "--lr", "0.5", "--preset", "tiny",
                    "--stage", "base", "--seed", saved_seed])
    ignored = next(line for line in log.splitlines() if line.startswith("ignored on --resume"))
    assert "--lr 0.5" in ignored and "--preset tiny" in ignored
    assert "--stage" not in ignored and "--seed" not in ignored  # the saved values: nothing to report
    assert "nothing to do" in log and "larger --max-steps" in log
    assert load(out / "ckpt.pt")["step"] == 20

    _, log = train(["--resume", "--out-dir", out, "--device", "cpu", "--max-steps", 24])
    assert "--max-steps 24 (was 20)" in log and "cosine" in log and "ignored" not in log
    assert re.search(r"step +24/24 \| loss", log)
    ckpt = load(out / "ckpt.pt")
    assert ckpt["step"] == 24 and ckpt["train_config"]["max_steps"] == 24
    assert not torch.equal(ckpt["model"]["norm.weight"], load(tiny["base"])["model"]["norm.weight"])  # it trained

    assert "below the step the run has reached (24)" in expect_user_error(
        train_script.main, ["--resume", "--out-dir", out, "--device", "cpu", "--max-steps", 22], capsys)


def test_resume_of_an_exported_checkpoint_is_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = load(tiny["base"])
    del ckpt["optimizer"]
    save_checkpoint(ckpt, str(out / "ckpt.pt"))
    assert "--resume needs the ckpt.pt that train.py wrote" in expect_user_error(
        train_script.main, ["--resume", "--out-dir", out, "--device", "cpu"], capsys)


def test_bf16_training_steps_emit_no_warnings(tiny, tmp_path):
    """--dtype bfloat16 forces autocast on (as on a CPU with native bf16): no dtype-mismatch
    warning from rms_norm (the q/k norms used to get bf16 input with an fp32 weight)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(["--preset", "tiny", "--data-dir", tiny["data"], "--out-dir", tmp_path / "b", "--device", "cpu",
               "--dtype", "bfloat16", "--max-steps", 2])
        train(["--stage", "head", "--preset", "tiny", "--data-dir", tiny["data"], "--base-ckpt", tmp_path / "b" / "ckpt.pt",
               "--out-dir", tmp_path / "h", "--device", "cpu", "--dtype", "bfloat16", "--max-steps", 2])
    assert not caught, [f"{w.filename}:{w.lineno}: {w.message}" for w in caught]
    assert load(tmp_path / "h" / "ckpt.pt")["step"] == 2


def test_command_line_error_has_no_traceback(tmp_path):
    """The real `python train.py` (run_cli in __main__), not only main() in-process."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--preset", "tiny", "--data-dir",
                        str(tmp_path / "missing"), "--out-dir", str(tmp_path / "out"), "--device", "cpu"],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "data/prepare.py" in lines[0], r.stderr


# ---------------------------------------------------------------------------------------------
# head stage


def test_head_stage_leaves_the_base_bit_identical(tiny):
    base, head = load(tiny["base"]), load(tiny["head"])
    assert head["step"] == 10 and head["base_ckpt"] == tiny["base"]
    assert_identical(base["model"], head["model"], "model")
    assert head["model_config"] == base["model_config"] and head["tokenizer"] == base["tokenizer"]
    assert head["base_sha256"] == state_sha256(base["model"])
    assert not any(k.startswith("embed_tokens") or k.startswith("lm_head") for k in head["head"])  # shared, not copied
    _, loaded = load_model(head)
    assert loaded is not None and loaded.head_config()["trained_draft_lens"] == [4, 6]
    evals = re.findall(r"eval step (\d+): K=(\d+) val kl ([\d.]+)", tiny["head_log"])
    assert [(s, k) for s, k, _ in evals] == [("5", "4"), ("5", "6"), ("10", "4"), ("10", "6")], tiny["head_log"]


def test_loss_position_decay_reaches_the_loss(tiny, tmp_path):
    """--loss-position-decay is saved with the run and changes what the head learns (same seed and
    batches as a uniform run); 0 is the default."""
    heads = {}
    for decay in (0, 2):
        argv = ["--stage", "head", "--preset", "tiny", "--data-dir", tiny["data"], "--base-ckpt", tiny["base"],
                "--out-dir", tmp_path / f"h{decay}", "--max-steps", 2, *CPU]
        train(argv + (["--loss-position-decay", decay] if decay else []))
        ckpt = load(tmp_path / f"h{decay}" / "ckpt.pt")
        assert ckpt["train_config"]["loss_position_decay"] == decay
        heads[decay] = ckpt["head"]
    assert any(not torch.equal(heads[0][k], heads[2][k]) for k in heads[0])


def test_mask_first_blocks_are_trained_and_evaluated(tiny, tmp_path, capsys):
    """--mask-first F makes a fraction of the training blocks open with MASK (the layout of a block
    drafted before its first token is known): saved with the run, it changes what the head learns
    from the same batches, and evaluation reports both layouts."""
    heads = {}
    for fraction in (1e-9, 0.5):  # the same random stream (a flag is drawn per block), but 1e-9 flags none
        argv = ["--stage", "head", "--preset", "tiny", "--data-dir", tiny["data"], "--base-ckpt", tiny["base"],
                "--out-dir", tmp_path / f"h{fraction}", "--max-steps", 2, "--eval-interval", 2, *CPU]
        _, log = train(argv + ["--mask-first", fraction])
        ckpt = load(tmp_path / f"h{fraction}" / "ckpt.pt")
        assert ckpt["train_config"]["mask_first"] == fraction
        heads[fraction] = ckpt["head"]
    assert re.findall(r"eval step 2: K=(\d+) MASK-first val kl", log) == ["4", "6"], log
    assert any(not torch.equal(heads[1e-9][k], heads[0.5][k]) for k in heads[0.5])
    assert "must be a fraction in [0, 1]" in expect_user_error(
        train_script.main, ["--stage", "head", "--preset", "tiny", "--data-dir", tiny["data"], "--base-ckpt", tiny["base"],
                     "--out-dir", str(tmp_path / "bad"), "--mask-first", "1.5"], capsys)


def test_head_resumes_bit_identically(tiny, tmp_path, monkeypatch):
    out = tmp_path / "head"
    argv = ["--stage", "head", "--preset", "tiny", "--data-dir", tiny["data"], "--base-ckpt", tiny["base"],
            "--out-dir", out, *CPU]
    with monkeypatch.context() as m:
        interrupt_at(m, 7)
        with pytest.raises(SystemExit):
            train(argv)
    assert load(out / "ckpt.pt")["step"] == 5
    train(["--resume", "--out-dir", out, "--device", "cpu"])
    straight, resumed = load(tiny["head"]), load(out / "ckpt.pt")
    for key in ("head", "model", "optimizer", "data_rng", "step", "base_sha256", "head_config"):
        assert_identical(straight[key], resumed[key], key)


def test_fresh_run_never_overwrites_a_checkpoint(tiny, tmp_path, capsys):
    """A new run pointed at a folder that already holds ckpt.pt is refused (the earlier run's work
    would be replaced at the first save); --resume is the way to continue it."""
    out = tmp_path / "base"
    out.mkdir()
    shutil.copy(tiny["base"], out / "ckpt.pt")
    before = (out / "ckpt.pt").read_bytes()
    line = expect_user_error(train_script.main, ["--preset", "tiny", "--data-dir", tiny["data"], "--out-dir", out, *CPU],
                             capsys)
    assert "already exists: continue it with --resume" in line
    assert (out / "ckpt.pt").read_bytes() == before


def test_head_on_self_distilled_data(tiny, tmp_path, capsys):
    """data/self_distill.py writes rows the base sampled after corpus prompts; the head stage trains
    on them (and evaluates on the corpus's held-out split); a head for another base is refused."""
    out = tmp_path / "self"
    distill = [str(a) for a in ("--base-ckpt", tiny["base"], "--data-dir", tiny["data"], "--out-dir", out,
                                "--tokens", 256, "--batch-size", 2, "--device", "cpu")]
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert load_script("self_distill").main(distill) == 0
    assert "shard 2/2" in log.getvalue() and "ETA" in log.getvalue()
    rows = torch.cat([load(out / "rows_00000.pt"), load(out / "rows_00001.pt")])
    assert rows.shape == (4, 64) and rows.dtype == torch.long  # 256 tokens // row_len 64 (the context)
    assert 0 <= int(rows.min()) and int(rows.max()) < 258
    corpus = ByteTokenizer().decode(load_tokens(os.path.join(tiny["data"], "train.bin"), "uint16").long())
    for row in rows:  # each row continues a 32-token prompt taken from the training text
        assert ByteTokenizer().decode(row[:32]) in corpus
    # resumable: a second run with the same flags finds every shard and writes nothing new
    before = (out / "rows_00001.pt").stat().st_mtime_ns
    with contextlib.redirect_stdout(io.StringIO()):
        load_script("self_distill").main(distill)
    assert (out / "rows_00001.pt").stat().st_mtime_ns == before
    _, log = train(["--stage", "head", "--preset", "tiny", "--data-dir", out, "--base-ckpt", tiny["base"],
                    "--out-dir", tmp_path / "head", "--max-steps", 2, *CPU])
    ckpt = load(tmp_path / "head" / "ckpt.pt")
    assert ckpt["step"] == 2 and ckpt["data_kind"] == "self-distilled"
    other = tmp_path / "other_base.pt"
    base = load(tiny["base"])
    base["model"]["norm.weight"] = base["model"]["norm.weight"] + 1.0
    save_checkpoint(base, str(other))
    line = expect_user_error(train_script.main, ["--stage", "head", "--preset", "tiny", "--data-dir", out,
                                                 "--base-ckpt", other, "--out-dir", tmp_path / "h2", *CPU], capsys)
    assert "written by another base model" in line


def write_self_distilled(folder, data_dir, tokens, response, val_response=None):
    """A self-distilled data folder as data/self_distill.py --prompts packs it, from given rows:
    rows_00000.pt and val_rows_00000.pt, and a meta.json taken from the corpus in data_dir."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    meta.update(kind="self-distilled", val="rows", row_len=tokens.size(1), n_rows=tokens.size(0))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    torch.save({"tokens": tokens, "response": response}, os.path.join(folder, "rows_00000.pt"))
    torch.save({"tokens": tokens, "response": response if val_response is None else val_response},
               os.path.join(folder, "val_rows_00000.pt"))
    return str(folder)


def test_token_ids_outside_the_vocabulary_are_refused_when_the_data_is_opened(tiny, tmp_path, capsys):
    """Issue 18 case 3: an id past the vocabulary (or negative, or a float tensor) anywhere in the
    data, even a single one, is one line naming the file and the value, at either stage: checked
    over all of the data when it is opened, not found by the embedding or trained on unnoticed."""
    data = tmp_path / "data"
    shutil.copytree(tiny["data"], data)
    tokens = load_tokens(str(data / "train.bin"), "uint16").to(torch.int32)
    tokens[31_000] = 65535  # one bad id, deep inside the file
    (data / "train.bin").write_bytes(tokens.to(torch.uint16).numpy().tobytes())
    base = ["--preset", "tiny", "--data-dir", data, "--out-dir", tmp_path / "b", *CPU]
    line = expect_user_error(train_script.main, base, capsys)
    assert "train.bin holds token id 65535 (token 31000), outside the vocabulary [0, 258)" in line
    head = ["--stage", "head", "--preset", "tiny", "--data-dir", data, "--base-ckpt", tiny["base"],
            "--out-dir", tmp_path / "h", *CPU]
    assert "token id 65535" in expect_user_error(train_script.main, head, capsys)
    assert not (tmp_path / "b").exists() and not (tmp_path / "h").exists()

    rows = torch.randint(0, 256, (6, 64), generator=torch.Generator().manual_seed(0))
    answer = torch.ones(6, 64, dtype=torch.bool)
    head[5] = tmp_path / "self"
    for value, at in ((60000, (4, 50)), (-3, (0, 1))):
        bad = rows.clone()
        bad[at] = value
        write_self_distilled(tmp_path / "self", data.parent / "data", bad, answer)
        line = expect_user_error(train_script.main, head, capsys)
        assert f"rows_00000.pt holds token id {value} (row {at[0]}, column {at[1]})" in line
    nan = rows.float()
    nan[2, 7] = float("nan")
    write_self_distilled(tmp_path / "self", data.parent / "data", nan, answer)
    line = expect_user_error(train_script.main, head, capsys)
    assert "rows_00000.pt holds a 2-D torch.float32 tensor for its tokens, not integer ids" in line


def test_head_needs_answers_as_long_as_a_block(tiny, tmp_path, capsys):
    """Issue 18 case 4: self-distilled answers all shorter than one block (or a mask with no answer
    at all) leave no anchor to train: one line saying what to change. Answers long enough in one
    row only are enough: batches without a block are drawn again."""
    rows = torch.randint(0, 256, (6, 64), generator=torch.Generator().manual_seed(0))
    short = torch.zeros(6, 64, dtype=torch.bool)
    short[:, 10:12] = short[:, 30:32] = True  # answers of 2 tokens: a block of 4 drafts 3
    head = ["--stage", "head", "--preset", "tiny", "--data-dir", tmp_path / "self", "--base-ckpt", tiny["base"],
            "--out-dir", tmp_path / "h", "--max-steps", 3, *CPU]
    for response in (short, torch.zeros(6, 64, dtype=torch.bool)):
        write_self_distilled(tmp_path / "self", tiny["data"], rows, response)
        line = expect_user_error(train_script.main, head, capsys)
        assert "no anchor fits in" in line and "a block of 4 needs 3 answer tokens in a row" in line
        assert "smaller --draft-lens or generate longer answers" in line
    held_out_short = short.clone()
    held_out_short[:, 40:45] = True  # 5 in a row: K=4 fits anywhere, but K=6 finds no aligned anchor
    write_self_distilled(tmp_path / "self", tiny["data"], rows, torch.ones(6, 64, dtype=torch.bool), held_out_short)
    line = expect_user_error(train_script.main, head, capsys)
    assert "val_rows_*.pt: a block of 6 needs 5 answer tokens in a row starting after a multiple of 6" in line
    one_row = torch.zeros(6, 64, dtype=torch.bool)
    one_row[0, 5:40] = True
    write_self_distilled(tmp_path / "self", tiny["data"], rows, one_row)
    _, log = train(head)
    assert load(tmp_path / "h" / "ckpt.pt")["step"] == 3 and "val kl" in log


def _replaced_base_resume(tiny, tmp_path):
    """An unfinished head run whose base file was later overwritten by a different model."""
    base_copy = tmp_path / "base.pt"
    shutil.copy(tiny["base"], base_copy)
    head = load(tiny["head"])
    head.update(step=5, base_ckpt=str(base_copy))
    save_checkpoint(head, str(tmp_path / "head" / "ckpt.pt"))
    other = load(base_copy)
    other["model"]["norm.weight"] = other["model"]["norm.weight"] + 1.0
    save_checkpoint(other, str(base_copy))
    return ["--resume", "--out-dir", tmp_path / "head", "--device", "cpu"]


HEAD_ERRORS = [
    ("missing_base", "needs --base-ckpt PATH"),
    ("nonexistent_base", "not found"),
    ("sentencepiece_data", "tokenized with sentencepiece"),
    ("draft_lens_1", "--draft-lens must be >= 2"),
    ("draft_lens_junk", "comma list of integers"),
    ("draft_len_too_long", "too long for training sequences of 64"),
    ("loss_typo", "invalid choice: 'kll'"),
    ("replaced_base", "sha256 differs"),
]


@pytest.mark.parametrize("case,message", HEAD_ERRORS, ids=[c for c, _ in HEAD_ERRORS])
def test_head_stage_bad_input(tiny, tmp_path, capsys, case, message):
    argv = ["--stage", "head", "--preset", "tiny", "--data-dir", tiny["data"], "--base-ckpt", tiny["base"],
            "--out-dir", tmp_path / "head", *CPU]
    if case == "missing_base":
        argv = argv[:6] + argv[8:]
    elif case == "nonexistent_base":
        argv[7] = tmp_path / "nope.pt"
    elif case == "sentencepiece_data":
        argv[5] = prepare_data(tiny["text"], tmp_path / "sp", "--tokenizer", "sentencepiece", "--vocab-size", 300)
    elif case == "draft_lens_1":
        argv += ["--draft-lens", "1"]
    elif case == "draft_lens_junk":
        argv += ["--draft-lens", "4,x"]
    elif case == "draft_len_too_long":
        argv += ["--draft-lens", "4,33"]
    elif case == "loss_typo":
        argv += ["--loss", "kll"]
    elif case == "replaced_base":
        argv = _replaced_base_resume(tiny, tmp_path)
    assert message in expect_user_error(train_script.main, argv, capsys)


def test_dry_run_estimates_without_loading_or_training(tiny, tmp_path, capsys, monkeypatch):
    """--dry-run prints memory and time for a head run and loads no weights and no data."""
    def never(*args, **kwargs):
        raise AssertionError("the dry run loaded weights or data")

    for name in ("load_data", "build_base", "load_pretrained"):
        monkeypatch.setattr(train_script, name, never)
    argv = ["--stage", "head", "--preset", "tiny", "--base-ckpt", tiny["base"], "--out-dir", tmp_path / "h",
            "--dry-run", "--tflops", "100", "--gpu-memory-gb", "80", "--processes", "2", *CPU]
    est, log = train(argv)
    assert "dry run: head" in log and "time per optimizer step" in log and "fits a 80 GB device" in log
    assert est["memory_total"] > est["memory"]["base weights (fp32)"] > 0 and est["seconds_per_step"] > 0
    assert not (tmp_path / "h").exists()
    assert " x 64 tokens;" in log  # the tiny base's context: no --seq-len and no packed rows
    # packed self-distilled rows fix the training length: the estimate uses it (meta.json only is read)
    packed = tmp_path / "packed"
    packed.mkdir()
    meta = json.loads(open(os.path.join(tiny["data"], "meta.json")).read())
    (packed / "meta.json").write_text(json.dumps({**meta, "kind": "self-distilled", "row_len": 40}))
    _, log = train(argv + ["--data-dir", packed])
    assert " x 40 tokens;" in log
    assert "--dry-run estimates a head-stage run" in expect_user_error(
        train_script.main, ["--preset", "tiny", "--data-dir", tiny["data"], "--dry-run", *CPU], capsys)


def test_resume_a_head_on_a_pretrained_base(tmp_path):
    """A head for a Hugging Face folder (kind orthrus-head, no base weights inside) resumes
    exactly: 2 + 2 steps equal 4 straight steps."""
    from test_pretrained import write_hf_folder

    folder = tmp_path / "qwen3"
    write_hf_folder(str(folder))
    data = prepare_data(write_corpus(tmp_path / "text", n_files=2, chars_per_file=3000), tmp_path / "data",
                        "--tokenizer-from", folder)
    flags = ["--stage", "head", "--preset", "tiny", "--base-ckpt", folder, "--data-dir", data, "--seq-len", 64, *CPU]
    train(flags + ["--out-dir", tmp_path / "straight", "--max-steps", 4])
    train(flags + ["--out-dir", tmp_path / "resumed", "--max-steps", 2])
    train(["--resume", "--out-dir", tmp_path / "resumed", "--max-steps", 4, "--device", "cpu"])
    straight, resumed = load(tmp_path / "straight" / "ckpt.pt"), load(tmp_path / "resumed" / "ckpt.pt")
    assert resumed["kind"] == "orthrus-head" and resumed["step"] == 4
    for key in ("head", "optimizer", "data_rng", "base_sha256"):
        assert_identical(straight[key], resumed[key], key)



def test_init_head_warm_starts_from_an_exported_compressed_head(tmp_path, capsys):
    """--init-head: a new run starts from an earlier head of the same base (here one exported in 4
    bits, as the shipped SmolLM2 head is), so training continues across sessions without the
    optimizer state; a head of another base is refused."""
    from test_pretrained import write_hf_folder

    folder = tmp_path / "qwen3"
    write_hf_folder(str(folder))
    data = prepare_data(write_corpus(tmp_path / "text", n_files=2, chars_per_file=3000), tmp_path / "data",
                        "--tokenizer-from", folder)
    flags = ["--stage", "head", "--preset", "tiny", "--base-ckpt", folder, "--data-dir", data, "--seq-len", 64, *CPU]
    train(flags + ["--out-dir", tmp_path / "first", "--max-steps", 3])
    export.main(["--ckpt", str(tmp_path / "first" / "ckpt.pt"), "--out", str(tmp_path / "small.pt"),
                 "--head-storage", "int4-delta"])
    _, log = train(flags + ["--out-dir", tmp_path / "second", "--max-steps", 1, "--lr", 1e-12,
                            "--init-head", tmp_path / "small.pt"])
    assert "head initialised from" in log
    small = load(tmp_path / "small.pt")
    base, _, _, _ = pretrained.load_pretrained(str(folder))
    start = unpack_head(small["head"], base.state_dict(), small["head_storage"])  # what the run must start from
    second = load(tmp_path / "second" / "ckpt.pt")["head"]
    fresh = DiffusionHead(base, small["head_config"]["mask_id"]).state_dict()  # what it would start from without
    for name in start:  # one step at lr 1e-12 leaves the warm start where it was
        torch.testing.assert_close(second[name], start[name], rtol=0, atol=1e-6)
    assert max((start[n] - fresh[n]).abs().max() for n in start) > 1e-3  # so a run that ignored it would fail
    bad = load(tmp_path / "small.pt")
    bad["base_sha256"] = "0" * 64
    torch.save(bad, tmp_path / "bad.pt")
    line = expect_user_error(train_script.main, flags + ["--out-dir", tmp_path / "third", "--init-head",
                                                         tmp_path / "bad.pt"], capsys)
    assert "--init-head" in line and "another base" in line


def test_resume_a_head_whose_base_moved(tmp_path, capsys):
    """Issue 18 case 12: the recorded base is gone -> one line naming it and --base-ckpt; with
    --base-ckpt at its new place the run resumes (the hash still guards against another base)."""
    from test_pretrained import write_hf_folder

    folder = tmp_path / "qwen3"
    write_hf_folder(str(folder))
    data = prepare_data(write_corpus(tmp_path / "text", n_files=2, chars_per_file=3000), tmp_path / "data",
                        "--tokenizer-from", folder)
    train(["--stage", "head", "--preset", "tiny", "--base-ckpt", folder, "--data-dir", data, "--seq-len", 64, *CPU,
           "--out-dir", tmp_path / "run", "--max-steps", 2])
    moved = tmp_path / "moved"
    shutil.move(str(folder), str(moved))
    resume = ["--resume", "--out-dir", tmp_path / "run", "--max-steps", 3, "--device", "cpu"]
    line = expect_user_error(train_script.main, resume, capsys)
    assert str(folder) in line and "--base-ckpt" in line
    train(resume + ["--base-ckpt", moved])
    assert load(tmp_path / "run" / "ckpt.pt")["step"] == 3

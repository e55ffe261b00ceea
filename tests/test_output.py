"""Where the scripts' output goes (issue 18): into a pipe whose reader has gone (`| head -1`), into
a folder that cannot be written, into an --out-dir another run is writing. Each is a quiet exit
that keeps the work, or one `error: ...` line with exit code 2."""

import builtins
import contextlib
import errno
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import export
from errors import UserError
from helpers import CPU, ROOT, expect_user_error, load_script
from test_pretrained import write_official_folder

cp = load_script("chat_prompts")
sd = load_script("self_distill")

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


# ---------------------------------------------------------------------------------------------
# case 2: a folder that cannot be written


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): make folder read-only (created if missing). chmod 555 where that works;
    where it changes nothing (root passes every permission check, and CI may run as root), every
    write inside the folder fails the way it fails in a read-only folder instead (PermissionError
    from open, os.open and os.mkdir; os.access says no), so the same tests run either way."""
    made = []

    def make(folder):
        folder = os.path.abspath(folder)
        os.makedirs(folder, exist_ok=True)
        os.chmod(folder, 0o555)
        made.append(folder)
        if not os.access(folder, os.W_OK):
            return folder  # a real read-only folder

        def inside(path):
            if isinstance(path, int):
                return False
            path = os.path.abspath(os.fsdecode(path))
            return path == folder or path.startswith(folder + os.sep)

        def refuse(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

        real_open, real_os_open, real_mkdir, real_access = builtins.open, os.open, os.mkdir, os.access

        def fake_open(file, mode="r", *args, **kwargs):
            if inside(file) and any(c in mode for c in "wax+"):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            if inside(path):
                refuse(path)
            return real_mkdir(path, *args, **kwargs)

        def fake_access(path, mode, *args, **kwargs):
            return False if inside(path) and mode & os.W_OK else real_access(path, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "mkdir", fake_mkdir)
        monkeypatch.setattr(os, "access", fake_access)
        return folder

    yield make
    monkeypatch.undo()
    for folder in made:
        os.chmod(folder, 0o755)  # so that pytest can remove it


def never_loads(monkeypatch, module, *names):
    def never(*args, **kwargs):
        raise AssertionError("loaded a model before refusing the output folder")

    for name in names:
        monkeypatch.setattr(module, name, never)


def test_self_distill_read_only_folders(tiny, tmp_path, capsys, read_only, monkeypatch):
    corpus = ["--base-ckpt", tiny["base"], "--data-dir", tiny["data"], "--tokens", 256, "--batch-size", 1,
              "--device", "cpu"]
    partial = tmp_path / "partial"
    with contextlib.redirect_stdout(io.StringIO()):
        sd.main([*map(str, corpus), "--out-dir", str(partial)])
    os.remove(partial / "rows_00002.pt")  # an interrupted run: two shards of four left to write
    ro = read_only(tmp_path / "ro")
    read_only(partial)
    never_loads(monkeypatch, sd, "load_checkpoint", "open_model")
    for out in (os.path.join(ro, "new"), ro, partial):  # a new folder; the root of a read-only mount; a resume
        line = expect_user_error(sd.main, [*corpus, "--out-dir", out], capsys)
        assert line.startswith("error: cannot write into --out-dir ") and "pass a folder you can write to" in line
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    line = expect_user_error(sd.main, ["--prompts", prompts, "--base", tiny["base"], "--out-dir", partial,
                                       "--pack-into", ro, "--device", "cpu"], capsys)
    assert line.startswith("error: cannot write into --pack-into ")


def test_self_distill_full_disk_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(sd, "save_checkpoint", full)
    line = expect_user_error(sd.main, ["--base-ckpt", tiny["base"], "--data-dir", tiny["data"], "--tokens", 128,
                                       "--batch-size", 1, "--device", "cpu", "--out-dir", tmp_path / "self"], capsys)
    assert "cannot write into --out-dir" in line and "No space left on device" in line


def test_chat_prompts_and_export_official_read_only(tiny, tmp_path, capsys, read_only, monkeypatch):
    ro = read_only(tmp_path / "ro")
    mine = tmp_path / "mine.txt"
    mine.write_text("Explain gravity.\nWrite a haiku.\nName a fruit.\n")
    for out in (ro, os.path.join(ro, "new")):
        line = expect_user_error(cp.main, ["--input", mine, "--out-dir", out], capsys)
        assert line.startswith("error: --out-dir ") and "cannot write into" in line
    never_loads(monkeypatch, export, "open_model")
    line = expect_user_error(export.main, ["--ckpt", tiny["head"], "--format", "official", "--out",
                                           os.path.join(ro, "new")], capsys)
    assert "cannot write into" in line and "pass a folder you can write to" in line


def test_export_official_write_failure_is_one_line(tmp_path, capsys, monkeypatch):
    """A write that fails once the model is loaded (a full disk; root in a read-only folder)."""
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    write_official_folder(tmp_path / "official")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    line = expect_user_error(export.main, ["--ckpt", tmp_path / "official", "--format", "official",
                                           "--out", tmp_path / "out"], capsys)
    assert f"cannot write into --out {tmp_path / 'out'} (No space left on device)" in line


# ---------------------------------------------------------------------------------------------
# case 8: two runs writing the same --out-dir at once


def test_a_held_out_dir_is_refused_and_a_dead_runs_lock_taken_over(tiny, tmp_path, capsys):
    """Another process holds the folder, as a running train.py or self_distill.py does: a fresh
    run, a --resume and self-distillation into it are refused, naming its pid. Killed (the lock
    file stays, with its pid), it holds nothing: the next run takes the folder over."""
    import train

    out = tmp_path / "run"
    train_argv = ["--preset", "tiny", "--max-steps", 2, "--data-dir", tiny["data"], "--out-dir", out, *CPU]
    with contextlib.redirect_stdout(io.StringIO()):
        train.main([str(a) for a in train_argv])
    hold = ("import sys, time, cli; held = cli.hold_folder(sys.argv[1]); held.__enter__(); print('held', flush=True); "
            "time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        in_use = f"error: {out} is in use by another run (pid {holder.pid}); wait for it to end or pass another --out-dir"
        assert expect_user_error(train.main, ["--resume", "--out-dir", out, "--max-steps", 4, "--device", "cpu"],
                                 capsys) == in_use
        assert expect_user_error(train.main, train_argv, capsys) == in_use
        assert expect_user_error(sd.main, ["--base-ckpt", tiny["base"], "--data-dir", tiny["data"], "--out-dir", out,
                                           "--device", "cpu"], capsys) == in_use
    finally:
        holder.kill()
        holder.wait()
    assert (out / "run.lock").read_text() == f"{holder.pid}\n"  # the dead run's lock file
    with contextlib.redirect_stdout(io.StringIO()):
        train.main(["--resume", "--out-dir", str(out), "--max-steps", "4", "--device", "cpu"])
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 4
    assert not (out / "run.lock").exists()  # removed when the run ends


def test_a_run_holds_its_folder_while_it_runs(tiny, tmp_path, capsys):
    """In-process: while hold_folder is held (as during train.main), a second holder is refused;
    released, it can be taken again, and a folder the run created and left empty is removed."""
    import cli

    folder = tmp_path / "new"
    with cli.hold_folder(str(folder)):
        assert (folder / "run.lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            with cli.hold_folder(str(folder), "--pack-into"):
                pass
    assert not folder.exists()
    line = expect_user_error(sd.main, ["--base-ckpt", tiny["base"], "--data-dir", tmp_path / "missing",
                                       "--out-dir", folder, "--device", "cpu"], capsys)
    assert "missing" in line and not folder.exists()  # a refused run leaves no empty folder behind


def test_an_empty_or_file_output_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    for out, message in (("", "--out-dir is empty; pass a folder"),
                         (tmp_path / "a_file", f"--out-dir {tmp_path / 'a_file'} is a file; pass a folder")):
        assert expect_user_error(sd.main, ["--base-ckpt", "x.pt", "--out-dir", out], capsys) == f"error: {message}"
        assert expect_user_error(cp.main, ["--out-dir", out], capsys) == f"error: {message}"

"""Shared by test_train.py and test_sample.py: a made-up corpus prepared with data/prepare.py, a
tiny base and a tiny base+head trained once per test session (`tiny_run`), and the checks for the
command-line contract (a user mistake is one `error: ...` line on stderr and exit code 2).

Everything runs on CPU with one thread: the models are ~30K parameters, so their matmuls are too
small to share, and on a busy 2-core machine OpenMP threads spin-waiting on each other make a
20-step run take ~20 s instead of ~1 s."""

import contextlib
import importlib.util
import io
import os
import random

import pytest
import torch

from cli import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every training run in the tests uses these on top of --preset tiny: fp32 everywhere, so the
# figures (and bit-identical resumes) do not depend on whether the CPU has native bf16.
CPU = ["--device", "cpu", "--dtype", "float32"]


@contextlib.contextmanager
def single_thread():
    """torch on one thread for the duration (restored afterwards: no global state leaks)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def load_script(name):
    """data/<name>.py loaded from its file, the way `python data/<name>.py` runs it (a script)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "data", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_prepare():
    return load_script("prepare")


def write_corpus(folder, n_files=6, chars_per_file=9000, seed=0):
    """n_files made-up, repetitive Python-like files (~54 KB in all): easy to learn a little of
    in 20 steps. Deterministic for a given seed."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "value", "items", "count", "total"]
    os.makedirs(folder, exist_ok=True)
    for i in range(n_files):
        lines, size = [], 0
        while size < chars_per_file:
            a, b = rng.choice(names), rng.choice(names)
            block = [f"def get_{a}_{b}(self, {a}):", f"    total = {a} + {rng.randint(0, 9)}",
                     f"    return self.{b}(total)", ""]
            lines += block
            size += sum(len(x) + 1 for x in block)
        with open(os.path.join(folder, f"module_{i}.py"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
    return folder


def prepare_data(text_dir, out_dir, *extra):
    """Run data/prepare.py on text_dir (stdout swallowed); returns out_dir."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        rc = load_prepare().main(["--input", str(text_dir), "--out-dir", str(out_dir), *map(str, extra)])
    assert rc == 0, log.getvalue()
    return str(out_dir)


def train(argv):
    """train.main(argv) on one thread; returns (its result, everything it printed)."""
    import train as train_script

    log = io.StringIO()
    with single_thread(), contextlib.redirect_stdout(log):
        result = train_script.main([str(a) for a in argv])
    return result, log.getvalue()


def expect_user_error(main, argv, capsys) -> str:
    """main(argv) through cli.run_cli must fail as a user mistake: exit code 2 and exactly one
    line on stderr, `error: ...`, no traceback. Returns that line."""
    capsys.readouterr()  # drop whatever came before
    with pytest.raises(SystemExit) as exc:
        run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


_TINY = {}


def tiny_run(tmp_path_factory) -> dict:
    """The session's shared artifacts, built on first use and reused by every test module:

        text   the made-up corpus folder
        data   that corpus prepared with the byte tokenizer
        base   ckpt.pt of `train.py --preset tiny` (20 steps) and base_log, what it printed
        head   ckpt.pt of `train.py --stage head --preset tiny --base-ckpt <base>` and head_log

    Tests must treat these files as read-only (copy them to modify)."""
    if not _TINY:
        root = tmp_path_factory.mktemp("tiny_run")
        text = write_corpus(root / "text")
        data = prepare_data(text, root / "data")
        _, base_log = train(["--preset", "tiny", "--data-dir", data, "--out-dir", root / "base", *CPU])
        base = str(root / "base" / "ckpt.pt")
        _, head_log = train(["--stage", "head", "--preset", "tiny", "--data-dir", data, "--base-ckpt", base,
                             "--out-dir", root / "head", *CPU])
        _TINY.update(text=str(text), data=data, base=base, base_log=base_log,
                     head=str(root / "head" / "ckpt.pt"), head_log=head_log)
    return dict(_TINY)

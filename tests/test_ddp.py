"""Data-parallel head training (torchrun, gloo on CPU): two processes with a global batch of 2 rows
follow the same loss trajectory as one process with the same global batch, within float
tolerance, and end with the same head; resuming with another number of processes is one line."""

import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from helpers import CPU, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv, nproc=1):
    """train.py as a fresh process (under torchrun when nproc > 1); returns (returncode, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), os.path.join(ROOT, "train.py")]
    else:
        cmd = [sys.executable, os.path.join(ROOT, "train.py")]
    r = subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    return r.returncode, r.stdout, r.stderr


def losses(log: str) -> list:
    return [float(x) for x in re.findall(r"^step +\d+/\d+ \| loss ([0-9.]+)", log, re.M)]


def masked_rows(tiny, folder):
    """A self-distilled folder whose rows have response masks (some prompt tokens, some answer
    tokens per row): anchors then depend on the rows, the case where ranks must agree on them."""
    import json

    from tokenizer import load_tokens

    os.makedirs(folder)
    meta = json.load(open(os.path.join(tiny["data"], "meta.json")))
    tokens = load_tokens(os.path.join(tiny["data"], "train.bin"), meta["dtype"])[: 24 * 64].long().view(24, 64)
    g = torch.Generator().manual_seed(0)
    response = torch.ones_like(tokens, dtype=torch.bool)
    for row in response:  # a "prompt" of 5-30 tokens at a random place in each row
        start, length = torch.randint(0, 30, (1,), generator=g).item(), torch.randint(5, 30, (1,), generator=g).item()
        row[start : start + length] = False
    torch.save({"tokens": tokens[:20], "response": response[:20]}, os.path.join(folder, "rows_00000.pt"))
    torch.save({"tokens": tokens[20:], "response": response[20:]}, os.path.join(folder, "val_rows_00000.pt"))
    json.dump({**meta, "kind": "self-distilled", "row_len": 64, "val": "rows"}, open(os.path.join(folder, "meta.json"), "w"))
    return str(folder)



@pytest.mark.parametrize("masked", [False, True], ids=["corpus", "response-masked"])
def test_two_processes_follow_one_process(tiny, tmp_path, masked):
    data = masked_rows(tiny, tmp_path / "rows") if masked else tiny["data"]
    flags = ["--stage", "head", "--preset", "tiny", "--data-dir", data, "--base-ckpt", tiny["base"],
             "--batch-size", 2, "--max-steps", 6, "--log-interval", 1, "--draft-lens", "4", *CPU]
    rc1, out1, err1 = run(flags + ["--out-dir", tmp_path / "one"])
    rc2, out2, err2 = run(flags + ["--out-dir", tmp_path / "two"], nproc=2)
    assert rc1 == 0, err1
    assert rc2 == 0, err2
    one, two = losses(out1), losses(out2)
    assert len(one) == len(two) == 6, (out1, out2)
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4, (one, two)
    assert out2.count("saved ") == out1.count("saved ")  # rank 0 alone prints and writes
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert b["world_size"] == 2 and a["world_size"] == 1
    for name, t in a["head"].items():
        torch.testing.assert_close(b["head"][name], t, rtol=1e-4, atol=1e-5)

    if masked:
        return
    # resuming the two-process run in one process is refused (one line, exit code 2)
    rc, out, err = run(["--resume", "--out-dir", tmp_path / "two", "--max-steps", 8, "--device", "cpu"])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "resume it with the same number" in lines[0], err

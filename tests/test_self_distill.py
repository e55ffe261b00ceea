"""data/chat_prompts.py and the prompts mode of data/self_distill.py: the prompt set, user prompt
files, batched answering over one KV cache, resumable shards, packing with a response mask.
CPU, seconds (the SmolLM2 smoke test ~10 s, skipped when the GGUF file is absent)."""

import contextlib
import dataclasses
import io
import json
import os

import pytest
import torch

import pretrained.bpe as pbpe
import tokenizer as tk
from checkpoint import save_checkpoint, state_sha256
from helpers import train
from helpers import expect_user_error, load_script
from test_pretrained import smollm2_path
from model import GPT, GPTConfig

cp = load_script("chat_prompts")
sd = load_script("self_distill")

CHAT_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
                 "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                 "{%- endif %}")
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unused>"]  # ids 256..259
END_OF_TURN = 258


# ---------------------------------------------------------------------------------------------
# a tiny chat model: 256 byte tokens + 4 added ones, a random GPT


def write_tiny_tokenizer(folder):
    singles = [bytes([pbpe.CHAR_TO_BYTE[c]]) for c in sorted(pbpe.CHAR_TO_BYTE)]
    vocab = {"".join(pbpe.BYTE_TO_CHAR[x] for x in b): i for i, b in enumerate(singles)}
    added = [{"id": 256 + k, "content": c, "special": True, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False} for k, c in enumerate(ADDED)]
    data = {"version": "1.0", "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "decoder": {"type": "ByteLevel"}, "model": {"type": "BPE", "vocab": vocab, "merges": []}}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(data, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"chat_template": CHAT_TEMPLATE}, f)
    return pbpe.BPETokenizer.from_file(str(folder))


def tiny_gpt(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=260, context_len=256, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=8,
                       mlp_hidden=64)
    model = GPT(config)
    with torch.no_grad():  # peaky logits, so greedy answers vary from prompt to prompt
        model.embed_tokens.weight.mul_(40.0)
    return model.to(dtype).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    """(checkpoint path, tokenizer): an orthrus-base .pt whose tokenizer (bpe) has a chat format."""
    root = tmp_path_factory.mktemp("tiny_chat")
    tok = write_tiny_tokenizer(root / "tok")
    model = tiny_gpt()
    path = str(root / "base.pt")
    save_checkpoint({"kind": "orthrus-base", "model_config": dataclasses.asdict(model.config),
                     "model": model.state_dict(), "tokenizer": tok.meta()}, path)
    return path, tok


def write_prompts(path, n=10):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Say {'hi ' * (i % 4)}number {i}."}) + "\n")
    return str(path)


def distill(argv):
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        assert sd.main([str(a) for a in argv]) == 0
    return log.getvalue()


def shard_bytes(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
            if f.startswith("gen_")}


# ---------------------------------------------------------------------------------------------
# the prompt set


SOURCE = '''
def add_numbers(a, b):
    """Return the sum of a and b."""
    total = a + b
    if total < 0:
        total = -total
    return total


def parse_header(line, strict=False):
    """Parses one header line."""
    name, _, value = line.partition(":")
    name = name.strip().lower()
    if strict and not value:
        raise ValueError(line)
    value = value.strip()
    return name, value
'''


def test_builtin_prompts_deterministic_and_split_disjoint():
    files = [("mod.py", SOURCE)]
    a = cp.builtin_prompts(files=files)
    assert a == cp.builtin_prompts(files=files)  # deterministic
    kinds = {r["kind"] for r in a}
    assert kinds == {"write", "explain", "complete", "chat", "math"}
    assert len({r["prompt"] for r in a}) == len(a) and len({r["id"] for r in a}) == len(a)  # no duplicates
    assert any(r["prompt"] == "Write a Python function `add_numbers(a, b)` that returns the sum of a and b."
               for r in a)
    assert any(r["prompt"].startswith("Write a Python function `parse_header(line, strict)` that parses") for r in a)
    assert [r["kind"] for r in a[:3]][1:] == ["chat", "math"]  # groups in turn, 1 : 1 : 1
    assert all(len(r["prompt"]) <= 1500 for r in a)
    assert all(len(r["prompt"]) <= 200 for r in cp.builtin_prompts(files=files, max_chars=200))
    train, heldout = cp.split_prompts(a)
    assert train and heldout and not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert 0.01 < len(heldout) / len(a) < 0.12
    # the side a prompt is on depends on its text only: a shorter run never moves a prompt across
    small_train, small_heldout = cp.split_prompts(a, max_train=50)
    assert len(small_train) == 50
    assert {r["id"] for r in small_heldout} <= {r["id"] for r in heldout}
    assert {r["id"] for r in small_train} <= {r["id"] for r in train}
    assert cp.third_person("Return the sum.") == "returns the sum"
    assert cp.third_person("Copy a file.") == "copies a file"
    assert cp.third_person("The answer.") is None


def test_chat_prompts_cli_files(tmp_path):
    src = tmp_path / "mine.txt"
    src.write_text("Explain gravity.\nWrite a haiku.\nList three colors.\nName a fruit.\n", encoding="utf-8")
    for out in (tmp_path / "a", tmp_path / "b"):
        with contextlib.redirect_stdout(io.StringIO()):
            assert cp.main(["--input", str(src), "--out-dir", str(out)]) == 0
    a = {n: (tmp_path / "a" / n).read_bytes() for n in ("train.jsonl", "heldout.jsonl")}
    assert a == {n: (tmp_path / "b" / n).read_bytes() for n in a}  # byte-identical reruns
    train = [json.loads(x) for x in a["train.jsonl"].decode().splitlines()]
    heldout = [json.loads(x) for x in a["heldout.jsonl"].decode().splitlines()]
    assert len(train) + len(heldout) == 4 and len(heldout) >= 1
    assert all(set(r) == {"id", "prompt", "kind", "source"} and r["kind"] == "user" for r in train + heldout)


def test_user_prompt_files(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first prompt\n\n\n", encoding="utf-8")
    assert [r["prompt"] for r in cp.read_prompt_file(lines)] == ["first prompt"]
    lines.write_text("one\ntwo  \n  three\n", encoding="utf-8")
    assert [r["prompt"] for r in cp.read_prompt_file(lines)] == ["one", "two", "three"]
    blocks = tmp_path / "blocks.txt"
    blocks.write_text("Complete:\ndef f(x):\n    return\n\nSecond\nprompt\n", encoding="utf-8")
    got = cp.read_prompt_file(blocks)
    assert [r["prompt"] for r in got] == ["Complete:\ndef f(x):\n    return", "Second\nprompt"]
    assert [r["source"] for r in got] == ["blocks.txt:1", "blocks.txt:5"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n\n{"prompt": "b", "kind": "math"}\n', encoding="utf-8")
    assert [(r["prompt"], r["kind"]) for r in cp.read_prompt_file(jl)] == [("a", "user"), ("b", "math")]


BAD_FILES = [
    ("empty.txt", b"  \n\n", "is empty"),
    ("latin1.txt", "caf\u00e9\n".encode("latin-1"), "not UTF-8"),
    ("broken.jsonl", b'{"prompt": "a"}\n{"prompt": \n', "line 2 is not valid JSON"),
    ("noprompt.jsonl", b'{"text": "a"}\n', 'line 1 has no "prompt" field'),
    ("blank.jsonl", b'{"prompt": "  "}\n', "non-empty string"),
]


@pytest.mark.parametrize("name,data,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_prompt_files(tmp_path, capsys, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    line = expect_user_error(cp.main, ["--input", path, "--out-dir", tmp_path / "out"], capsys)
    assert message in line
    line = expect_user_error(sd.main, ["--prompts", path, "--base", "nowhere.gguf", "--out-dir", tmp_path / "o"],
                             capsys)
    assert message in line


def test_pack_invariants():
    recs = [{"prompt_ids": [1, 2, 3], "response_ids": [4, 5, 9], "stopped": True},
            {"prompt_ids": [6], "response_ids": [7, 8], "stopped": False},
            {"prompt_ids": [10, 11], "response_ids": [12], "stopped": True}]
    convs = [sd.conversation(r, end_id=99) for r in recs]
    assert convs[1] == ([6, 7, 8, 99], [False, True, True, False])  # a cut answer gets an end id, not generated
    tokens, response, fill = sd.pack(convs, 4, fill_id=0)
    assert tokens.shape == response.shape == (4, 4) and tokens.dtype == torch.long and response.dtype == torch.bool
    assert tokens.flatten().tolist() == [1, 2, 3, 4, 5, 9, 6, 7, 8, 99, 10, 11, 12, 0, 0, 0] and fill == 3
    assert tokens[response].tolist() == [4, 5, 9, 7, 8, 12]  # exactly the generated tokens


# ---------------------------------------------------------------------------------------------
# the command: shards, resume, packing, refusals


def test_prompts_mode_end_to_end(tiny_chat, tmp_path, capsys):
    ckpt, tok = tiny_chat
    prompts = write_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "self"
    argv = ["--prompts", prompts, "--base", ckpt, "--out-dir", out, "--batch-size", 3, "--max-new-tokens", 8,
            "--row-len", 64, "--device", "cpu", "--seed", 5]
    log = distill(argv)
    assert "chat format" in log and "shard 4/4" in log and "ETA" in log and "generated tok/s" in log
    assert "stopped at an end id" in log and "hit --max-new-tokens" in log
    meta = json.loads((out / "meta.json").read_text())
    assert meta["kind"] == "self-distilled" and meta["val"] == "rows" and meta["row_len"] == 64
    assert "source_data_dir" not in meta and meta["tokenizer"] == tok.meta() and meta["chat"] is True
    assert meta["eot_id"] == 256 and meta["end_of_turn_id"] == END_OF_TURN and END_OF_TURN in meta["stop_ids"]
    assert meta["tokenizer_sha256"] == tok.meta()["sha256"] and meta["vocab_size"] == 260
    assert meta["dtype"] == "uint16" and meta["temperature"] == 0.8
    assert meta["base_sha256"] == state_sha256(tiny_gpt().state_dict())  # what train.py compares

    # the shards hold every prompt once; the packed rows hold exactly the training conversations
    recs = [json.loads(line) for f in sorted(os.listdir(out)) if f.startswith("gen_")
            for line in (out / f).read_text().splitlines()]
    assert sorted((r["split"], r["index"]) for r in recs) == sorted(
        [("train", i) for i in range(meta["n_prompts"]["train"])] + [("heldout", i) for i in range(meta["n_prompts"]["heldout"])])
    for r in recs:
        text = tok.decode(r["prompt_ids"])
        assert text.startswith("<|im_start|>user\nSay ") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert 1 <= len(r["response_ids"]) <= 8
        ends = [t for t in r["response_ids"] if t in meta["stop_ids"]]
        assert (ends == [r["response_ids"][-1]]) if r["stopped"] else (not ends and len(r["response_ids"]) == 8)
    rows = torch.load(out / "rows_00000.pt", weights_only=True)
    assert set(rows) == {"tokens", "response"} and rows["tokens"].shape[1] == 64
    assert rows["tokens"].shape == rows["response"].shape == (meta["n_rows"], 64)
    train = sorted((r for r in recs if r["split"] == "train"), key=lambda r: r["index"])
    stream = [t for r in train for t in r["prompt_ids"] + r["response_ids"] + ([] if r["stopped"] else [END_OF_TURN])]
    flat = rows["tokens"].flatten().tolist()
    fill = len(flat) - len(stream)
    assert 0 <= fill < 64 and flat[:len(stream)] == stream and set(flat[len(stream):]) <= {256}
    assert rows["tokens"][rows["response"]].tolist() == [t for r in train for t in r["response_ids"]]
    val = torch.load(out / "val_rows_00000.pt", weights_only=True)
    heldout = sorted((r for r in recs if r["split"] == "heldout"), key=lambda r: r["index"])
    assert val["tokens"][val["response"]].tolist() == [t for r in heldout for t in r["response_ids"]]
    assert meta["summary"]["conversations"] == len(recs) == 10
    assert meta["summary"]["response_tokens"] == sum(len(r["response_ids"]) for r in recs)

    # an interrupted run (two shards lost) resumes to byte-identical shards
    before = shard_bytes(out)
    for name in ("gen_00001.jsonl", "gen_00003.jsonl", "rows_00000.pt"):
        os.remove(out / name)
    log = distill(argv)
    assert "shard 2/4" in log and "shard 4/4" in log and "shard 1/4" not in log
    assert shard_bytes(out) == before
    assert torch.equal(torch.load(out / "rows_00000.pt", weights_only=True)["tokens"], rows["tokens"])
    # another --row-len only packs again
    distill([*argv[:-6], "--row-len", 32, "--device", "cpu", "--seed", 5])
    assert json.loads((out / "meta.json").read_text())["row_len"] == 32 and shard_bytes(out) == before

    # --pack-into: the shards that exist so far, packed elsewhere (generation goes on in --out-dir)
    os.remove(out / "gen_00003.jsonl")
    distill([*argv, "--pack-into", tmp_path / "partial"])
    part = json.loads((tmp_path / "partial" / "meta.json").read_text())
    assert part["partial"] == "3/4 shards" and part["summary"]["conversations"] == 10 - len(
        [line for line in before["gen_00003.jsonl"].decode().splitlines()])
    assert not (out / "gen_00003.jsonl").exists()  # nothing generated
    distill(argv)  # the main folder completes as before
    assert shard_bytes(out) == before

    # refused: other sampling settings, another seed, other prompts, in the same folder
    for change, what in ((["--temperature", "1.0"], "temperature"), (["--seed", "6"], "seed"),
                         (["--max-new-tokens", "9"], "max_new_tokens")):
        line = expect_user_error(sd.main, [*argv, *change], capsys)
        assert "other settings" in line and what in line
    other = write_prompts(tmp_path / "q.jsonl", n=11)
    line = expect_user_error(sd.main, ["--prompts", other, *argv[2:]], capsys)
    assert "prompts_sha256" in line


def test_head_trains_on_packed_rows(tiny_chat, tmp_path):
    """The packed format is what train.py reads: a head trains on the rows (anchors on response
    tokens) and evaluates on val_rows."""
    ckpt, _ = tiny_chat
    prompts = write_prompts(tmp_path / "p.jsonl", n=12)
    distill(["--prompts", prompts, "--base", ckpt, "--out-dir", tmp_path / "self", "--max-new-tokens", 24,
             "--row-len", 64, "--device", "cpu"])
    _, log = train(["--stage", "head", "--preset", "tiny", "--data-dir", tmp_path / "self", "--base-ckpt", ckpt,
                    "--out-dir", tmp_path / "head", "--max-steps", 2, "--seq-len", 64, "--device", "cpu",
                    "--dtype", "float32"])
    assert "val kl" in log
    assert torch.load(tmp_path / "head" / "ckpt.pt", weights_only=True)["data_kind"] == "self-distilled"


def test_prompts_mode_errors(tiny_chat, tmp_path, capsys):
    ckpt, _ = tiny_chat
    prompts = write_prompts(tmp_path / "p.jsonl")
    out = ["--out-dir", tmp_path / "o", "--device", "cpu"]
    assert "needs --base" in expect_user_error(sd.main, ["--prompts", prompts, *out], capsys)
    assert "not found" in expect_user_error(cp.main, ["--input", tmp_path / "missing.txt"], capsys)
    assert "not found" in expect_user_error(sd.main, ["--prompts", prompts, "--base", tmp_path / "x.gguf", *out], capsys)
    assert "top_p" in expect_user_error(sd.main, ["--prompts", prompts, "--base", ckpt, "--top-p", "0", *out], capsys)
    assert ">= 1" in expect_user_error(sd.main, ["--prompts", prompts, "--base", ckpt, "--max-new-tokens", "0", *out],
                                       capsys)
    one = tmp_path / "one.txt"
    one.write_text("only one prompt\n", encoding="utf-8")
    assert "held-out" in expect_user_error(sd.main, ["--prompts", one, "--base", ckpt, *out], capsys)
    # a model without a chat format: refused with --chat true, plain text with auto
    model = tiny_gpt()
    plain = str(tmp_path / "plain.pt")
    save_checkpoint({"kind": "orthrus-base", "model_config": dataclasses.asdict(model.config),
                     "model": model.state_dict(), "tokenizer": tk.ByteTokenizer().meta()}, plain)
    line = expect_user_error(sd.main, ["--prompts", prompts, "--base", plain, "--chat", "true", *out], capsys)
    assert "no chat format" in line and "--chat false" in line
    log = distill(["--prompts", prompts, "--base", plain, "--out-dir", tmp_path / "plain", "--max-new-tokens", 4,
                   "--row-len", 16, "--device", "cpu", "--temperature", 0])
    assert "plain text" in log and json.loads((tmp_path / "plain" / "meta.json").read_text())["chat"] is False


# ---------------------------------------------------------------------------------------------
# the real model


@pytest.mark.skipif(smollm2_path() is None, reason="SmolLM2-135M-Instruct GGUF not installed")
def test_smollm2_two_short_answers(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is 2 + 2? Answer with one number.\nSay hello.\nName a color.\n", encoding="utf-8")
    out = tmp_path / "smol"
    log = distill(["--prompts", prompts, "--base", smollm2_path(), "--out-dir", out, "--max-new-tokens", 16,
                   "--row-len", 128, "--device", "cpu", "--temperature", 0])
    assert "chat format" in log
    meta = json.loads((out / "meta.json").read_text())
    assert meta["end_of_turn_id"] == 2 and 2 in meta["stop_ids"]
    recs = [json.loads(line) for line in (out / "gen_00000.jsonl").read_text().splitlines()]
    assert len(recs) == 3
    for r in recs:
        assert r["response"].strip() and "\ufffd" not in r["response"]
        assert r["response_ids"][-1] == 2 if r["stopped"] else len(r["response_ids"]) == 16
        if r["stopped"]:
            assert r["response"].endswith("<|im_end|>")

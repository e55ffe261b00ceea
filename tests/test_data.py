"""data/prepare.py tests: deterministic output, split by file, token files that decode back to the
corpus, meta fields, stdlib file discovery, and one-line errors with exit code 2. No network:
the download error is produced by a refused connection to 127.0.0.1."""
import importlib.util
import json
import os

import pytest

import tokenizer as tk
from helpers import expect_user_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prepare():
    """data/prepare.py as a module (data/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("prepare", os.path.join(ROOT, "data", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def corpus(tmp_path):
    """A small folder of documents, plus files prepare must leave out. Returns (dir, {name: text})."""
    root = tmp_path / "proj"
    texts = {}
    for i in range(12):
        sub = "pkg/" if i % 3 == 0 else ""
        ext = "py" if i % 2 else "txt"
        name = f"proj/{sub}file_{i:02d}.{ext}"
        texts[name] = f"# document {i}\ndef f_{i}(x):\n    return x * {i}  # caf\u00e9 \u2581\n" * (i + 1)
    texts["proj/crlf.txt"] = "line one\r\nline <|endoftext|> two\r\n"
    for name, text in texts.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
    (root / "empty.py").write_bytes(b"")  # empty: no document
    (root / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))  # not UTF-8: skipped, listed
    (root / "image.bin").write_bytes(b"\x00\x01")  # does not match --glob
    for hidden in (".git", "__pycache__"):
        (root / hidden).mkdir()
        (root / hidden / "x.py").write_text("never read\n")
    return root, texts


def run_ok(prepare, capsys, *argv):
    rc = prepare.main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def run_error(prepare, capsys, *argv):
    """A user mistake: through cli.run_cli, exit code 2 and one line `error: ...` on stderr."""
    return expect_user_error(prepare.main, argv, capsys)


def read_dir(d):
    return {name: (d / name).read_bytes() for name in sorted(os.listdir(d))}


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_prepare_is_deterministic_and_decodes_back(prepare, capsys, corpus, tmp_path, kind):
    root, texts = corpus
    extra = ["--vocab-size", 320] if kind == "sentencepiece" else []
    for out in ("out1", "out2"):
        run_ok(prepare, capsys, "--input", root, "--tokenizer", kind, "--out-dir", tmp_path / out, *extra)
    first, second = read_dir(tmp_path / "out1"), read_dir(tmp_path / "out2")
    expected = {"meta.json", "train.bin", "val.bin"} | ({"tokenizer.model"} if kind == "sentencepiece" else set())
    assert set(first) == expected
    assert first == second  # byte-identical, meta included (no timestamps, no out-dir paths)

    out = tmp_path / "out1"
    meta = json.loads((out / "meta.json").read_text())
    for key in ("tokenizer", "vocab_size", "eot_id", "mask_id", "dtype", "corpus_sha256", "train", "val"):
        assert key in meta
    assert meta["skipped_files"] == ["proj/latin1.txt"]
    tok = tk.load_tokenizer(meta, str(out))
    assert (tok.kind, tok.vocab_size, tok.eot_id, tok.mask_id) == (
        kind, meta["vocab_size"], meta["eot_id"], meta["mask_id"])
    assert meta["dtype"] == "uint16"

    # Split by file: every document in exactly one split, both splits non-empty.
    train_files, val_files = meta["train"]["files"], meta["val"]["files"]
    assert train_files and val_files and not set(train_files) & set(val_files)
    assert sorted(train_files + val_files) == sorted(texts)
    assert len(val_files) == 1  # ceil(0.05 * 13)

    # Each token file is its documents, in name order, each followed by end-of-text.
    for split, names in (("train", train_files), ("val", val_files)):
        ids = tk.load_tokens(str(out / f"{split}.bin"), meta["dtype"]).long().tolist()
        assert len(ids) == meta[split]["tokens"]
        assert ids[-1] == tok.eot_id and ids.count(tok.eot_id) == len(names)
        assert all(0 <= i < tok.vocab_size and i != tok.mask_id for i in ids)
        docs, current = [], []
        for i in ids:
            if i == tok.eot_id:
                docs.append(tok.decode(current))
                current = []
            else:
                current.append(i)
        assert docs == [texts[name] for name in names]


def test_split_depends_on_names_not_tokenizer(prepare, capsys, corpus, tmp_path):
    root, _ = corpus
    run_ok(prepare, capsys, "--input", root, "--out-dir", tmp_path / "a", "--val-fraction", 0.3)
    run_ok(prepare, capsys, "--input", root, "--out-dir", tmp_path / "b", "--val-fraction", 0.3,
           "--tokenizer", "sentencepiece", "--vocab-size", 320)
    a = json.loads((tmp_path / "a" / "meta.json").read_text())
    b = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert a["val"]["files"] == b["val"]["files"] and len(a["val"]["files"]) == 4  # ceil(0.3 * 13)
    assert a["corpus_sha256"] == b["corpus_sha256"]


def test_doc_separator_and_glob(prepare, capsys, tmp_path):
    stories = tmp_path / "stories.txt"
    stories.write_text("Once upon a time.\n<|endoftext|>\nThe end.\n<|endoftext|>\n\n"
                       "A third one.\n<|endoftext|>\n", encoding="utf-8")
    run_ok(prepare, capsys, "--input", stories, "--doc-separator", "<|endoftext|>",
           "--val-fraction", 0.3, "--out-dir", tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train"]["documents"] + meta["val"]["documents"] == 3
    tok = tk.ByteTokenizer()
    text = "".join(tok.decode(tk.load_tokens(str(tmp_path / "out" / f"{s}.bin"), "uint16"))
                   for s in ("train", "val"))
    assert sorted(text.split("<|endoftext|>")[:-1]) == ["A third one.", "Once upon a time.", "The end."]


def test_bad_inputs(prepare, capsys, corpus, tmp_path, monkeypatch):
    root, _ = corpus
    out = tmp_path / "out"
    msg = run_error(prepare, capsys, "--input", tmp_path / "nope", "--out-dir", out)
    assert "does not exist" in msg and "nope" in msg
    assert not out.exists()  # a failed run leaves no empty output folder behind
    (tmp_path / "empty_dir").mkdir()
    assert "empty corpus" in run_error(prepare, capsys, "--input", tmp_path / "empty_dir", "--out-dir", out)
    assert "invalid choice: 'words'" in run_error(prepare, capsys, "--tokenizer", "words")
    msg = run_error(prepare, capsys, "--input", root, "--tokenizer", "sentencepiece", "--vocab-size", 100,
                    "--out-dir", out)
    assert "--vocab-size 100 is too small" in msg
    assert "either --source or --input" in run_error(prepare, capsys, "--source", "stdlib", "--input", root)
    assert "--val-fraction" in run_error(prepare, capsys, "--input", root, "--val-fraction", 1.5)
    single = tmp_path / "one.txt"
    single.write_text("just one document\n")
    assert "at least 2 documents" in run_error(prepare, capsys, "--input", single, "--out-dir", out)
    # issue 8: an existing file as --out-dir, an empty separator (were tracebacks)
    msg = run_error(prepare, capsys, "--input", root, "--out-dir", single)
    assert f"--out-dir {single} is a file" in msg
    msg = run_error(prepare, capsys, "--input", root, "--doc-separator", "", "--out-dir", out)
    assert "--doc-separator is empty" in msg
    msg = run_error(prepare, capsys, "--input", root, "--out-dir", single / "sub")
    assert "cannot create --out-dir" in msg

    # Offline download: port 9 on localhost refuses at once, so nothing can hang.
    url = "http://127.0.0.1:9/TinyStories-test.txt"
    msg = run_error(prepare, capsys, "--source", "tinystories", "--url", url, "--out-dir", out)
    assert f"could not download {url}" in msg and "--input" in msg
    assert not [n for n in os.listdir(out) if n.startswith("TinyStories")]  # no partial file left

    # tiktoken without network and without cache (simulated: get_encoding fails like requests does).
    import tiktoken

    def offline(name):
        raise OSError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    msg = run_error(prepare, capsys, "--input", root, "--tokenizer", "tiktoken", "--out-dir", out)
    assert "could not load tiktoken encoding 'gpt2'" in msg


def test_tiny_split_is_warned_about(prepare, capsys, tmp_path):
    """A corpus whose train split holds a handful of tokens prepares (a small --seq-len can use
    it) but says clearly, at preparation time, that the presets' windows will not fit."""
    for name, text in (("a.txt", "tiny"), ("b.txt", "small"), ("c.txt", "short")):
        (tmp_path / name).write_text(text)
    rc = prepare.main(["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), str(tmp_path / "c.txt"),
                       "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0
    lines = [line for line in err.splitlines() if line.startswith("warning: train.bin has only")]
    assert len(lines) == 1 and "lower --val-fraction" in lines[0] and "train.py will refuse it" in lines[0], err
    assert "warning: val.bin has only" in err


def test_stdlib_file_discovery(prepare):
    root = prepare.stdlib_root()
    files = prepare.find_files(root, ["*.py"], include_tests=False)
    assert files == sorted(files) and len(files) > 300
    assert "os.py" in files and "json/__init__.py" in files
    for rel in files:
        parts = rel.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(parts), rel
        assert rel.endswith(".py") and "\\" not in rel
    with_tests = prepare.find_files(root, ["*.py"], include_tests=True)
    assert set(files) < set(with_tests)
    assert any(rel.startswith("test/") for rel in with_tests)
    assert not any("site-packages" in rel for rel in with_tests)


def test_stdlib_corpus_byte(prepare, capsys, tmp_path):
    """The real default corpus with the byte tokenizer: about 12 MB, a couple of seconds."""
    out = run_ok(prepare, capsys, "--out-dir", tmp_path / "stdlib")
    assert "documents" in out and "bytes/token" in out
    meta = json.loads((tmp_path / "stdlib" / "meta.json").read_text())
    n_docs = meta["train"]["documents"] + meta["val"]["documents"]
    assert meta["source"] == "stdlib" and n_docs > 300
    assert 0.04 <= meta["val"]["documents"] / n_docs <= 0.06
    # Byte tokens: one per UTF-8 byte plus one end-of-text per document.
    for split in ("train", "val"):
        assert meta[split]["tokens"] == meta[split]["bytes"] + meta[split]["documents"]
        assert os.path.getsize(tmp_path / "stdlib" / f"{split}.bin") == 2 * meta[split]["tokens"]

"""Tokenizer tests: exact round trips, reserved special ids, clear errors, meta round trips.

All offline: tiktoken uses a tiny encoding built here, sentencepiece a model trained here on a
made-up corpus (vocab 320, a fraction of a second).
"""
import json
import random

import pytest
import torch

import tokenizer as tk
from errors import UserError

# Text that tends to break tokenizers: sentencepiece's own space stand-in (U+2581), the special
# strings written literally, byte-piece and <unk> look-alikes, CRLF, tabs, NUL, emoji, combining
# marks, unusual whitespace, and characters the sentencepiece model never saw in training.
TRICKY = [
    "",
    " ",
    "\n",
    "def f(x):\n    return x + 1\n",
    "  leading and trailing spaces  ",
    "\u2581 literal \u2581\u2581 U+2581 \u2581",
    "<|endoftext|> and <|mask|> written literally<|endoftext|>",
    "<unk> <0x41> <s> </s>",
    "a\r\nb\rc\td\x00e\x0bf\x0c",
    "caf\u00e9 cafe\u0301 \u65e5\u672c\u8a9e \U0001f642\U0001f44d\U0001f3fd",
    "\ufeffBOM \u00a0nbsp \u2028line-sep \u3000ideographic",
    "\U0010ffff\ue000 private use",
]

# A made-up code corpus for sentencepiece: varied enough to learn a few dozen merges.
CORPUS = [
    f"def function_{i}(x, y={i}):\n    \"\"\"Doc {i}.\"\"\"\n    if x > {i * 7}:\n"
    f"        return x * y\n    for k in range({i}):\n        x += k\n    return x\n"
    for i in range(60)
] + ["class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"] * 5


def random_texts(n, seed=0):
    """Random strings over a pool that mixes ASCII code, whitespace, specials and rare chars."""
    rng = random.Random(seed)
    pool = (list("abcxyz_():=+-*/'\"#0123456789") + [" ", "  ", "    ", "\n", "\t", "\r\n"]
            + ["\u2581", "<|endoftext|>", "<|mask|>", "\u00e9", "\u65e5", "\U0001f642", "\x00"])
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def tiny_tiktoken_encoding():
    """A small byte-level BPE built in memory (no download): 256 bytes, 4 merges, <|endoftext|>."""
    import tiktoken

    ranks = {bytes([i]): i for i in range(256)}
    for merge in [b"  ", b"    ", b"de", b"def"]:
        ranks[merge] = len(ranks)
    return tiktoken.Encoding(
        name="tiny-test",
        pat_str=r"""'s|'t| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": len(ranks)},
    )


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("sp")
    tk.train_sentencepiece(CORPUS, str(d / "tokenizer"), 320)
    return d


@pytest.fixture(params=["byte", "sentencepiece", "tiktoken"])
def tok(request, sp_dir):
    if request.param == "byte":
        return tk.ByteTokenizer()
    if request.param == "sentencepiece":
        return tk.SentencePieceTokenizer(str(sp_dir / "tokenizer.model"))
    return tk.TiktokenTokenizer(tiny_tiktoken_encoding())


# -----------------------------------------------------------------------------
# all kinds


def test_round_trip_exact(tok):
    for text in TRICKY + random_texts(200):
        ids = tok.encode(text)
        assert tok.decode(ids) == text, (tok.kind, text)


def test_special_ids_reserved(tok):
    assert tok.eot_id != tok.mask_id
    assert 0 <= tok.eot_id < tok.vocab_size and 0 <= tok.mask_id < tok.vocab_size
    for text in TRICKY + random_texts(200, seed=1):
        ids = tok.encode(text)
        assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
        assert tok.eot_id not in ids and tok.mask_id not in ids, (tok.kind, text)


def test_decode_renders_specials_and_accepts_tensors(tok):
    ids = tok.encode("ab") + [tok.eot_id] + tok.encode("c") + [tok.mask_id]
    assert tok.decode(ids) == "ab<|endoftext|>c<|mask|>"
    assert tok.decode(torch.tensor(ids)) == "ab<|endoftext|>c<|mask|>"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_unencodable_character(tok):
    with pytest.raises(ValueError) as e:
        tok.encode("ok \udc80 no")
    msg = str(e.value)
    assert "'\\udc80'" in msg and "index 3" in msg and "surrogate" in msg and "\n" not in msg


def test_meta_is_plain_json_and_reloads(tok, sp_dir, monkeypatch):
    meta = tok.meta()
    assert json.loads(json.dumps(meta)) == meta
    for key in ("kind", "vocab_size", "eot_id", "mask_id"):
        assert meta[key] == getattr(tok, key)
    if tok.kind == "tiktoken":
        # A named encoding reloads through tiktoken.get_encoding; stand in for the download.
        import tiktoken

        monkeypatch.setattr(tiktoken, "list_encoding_names", lambda: ["tiny-test"])
        monkeypatch.setattr(tiktoken, "get_encoding", lambda name: tiny_tiktoken_encoding())
    again = tk.load_tokenizer(meta, str(sp_dir))
    assert again.meta() == meta
    text = "def g():\n    return '\u2581<|endoftext|>'\n"
    assert again.encode(text) == tok.encode(text)
    # A data meta.json holds the tokenizer meta under "tokenizer"; that works too.
    assert tk.load_tokenizer({"tokenizer": meta, "vocab_size": tok.vocab_size}, str(sp_dir)).meta() == meta


def test_load_tokenizer_rejects_mismatch():
    with pytest.raises(UserError, match="vocab_size"):
        tk.load_tokenizer({"kind": "byte", "vocab_size": 300, "eot_id": 256, "mask_id": 257})
    with pytest.raises(UserError, match="unknown tokenizer kind"):
        tk.load_tokenizer({"kind": "words"})


# -----------------------------------------------------------------------------
# byte


def test_byte_layout_and_cut_stream():
    tok = tk.ByteTokenizer()
    assert (tok.vocab_size, tok.eot_id, tok.mask_id) == (258, 256, 257)
    assert tok.encode("A\u00e9") == [65, 0xC3, 0xA9]
    # A stream cut in the middle of a character decodes with U+FFFD instead of failing.
    assert tok.decode([65, 0xC3]) == "A\ufffd"
    assert tok.decode([0xC3, 256, 66]) == "\ufffd<|endoftext|>B"


# -----------------------------------------------------------------------------
# sentencepiece


def test_sentencepiece_layout(sp_dir):
    tok = tk.SentencePieceTokenizer(str(sp_dir / "tokenizer.model"))
    assert (tok.eot_id, tok.mask_id) == (1, 2)
    assert tok.vocab_size == 320
    assert tok.encode("\n") == [3]  # newline is one piece of its own
    # The ~20 merges that fit in 320 ids were learned: code takes clearly fewer tokens than bytes.
    text = CORPUS[0]
    assert len(tok.encode(text)) < 0.75 * len(text.encode())


def test_sentencepiece_training_is_deterministic(sp_dir, tmp_path):
    again = tk.train_sentencepiece(iter(CORPUS), str(tmp_path / "other_name"), 320)
    assert (tmp_path / "other_name.model").read_bytes() == (sp_dir / "tokenizer.model").read_bytes()
    first = tk.SentencePieceTokenizer(str(sp_dir / "tokenizer.model"))
    assert again.meta()["model_sha256"] == first.meta()["model_sha256"]


def test_sentencepiece_trains_from_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(CORPUS), encoding="utf-8")
    tok = tk.train_sentencepiece(str(path), str(tmp_path / "m"), 320)
    assert tok.decode(tok.encode(CORPUS[3])) == CORPUS[3]


def test_sentencepiece_vocab_too_small(tmp_path):
    with pytest.raises(UserError, match="too small"):
        tk.train_sentencepiece(CORPUS, str(tmp_path / "m"), 100)
    # Enough for the fixed pieces but not for this corpus's characters.
    many_chars = ["".join(chr(0x4E00 + i) for i in range(k, k + 50)) for k in range(0, 400, 50)]
    with pytest.raises(UserError, match="too small for this corpus"):
        tk.train_sentencepiece(many_chars, str(tmp_path / "m"), 270)


def test_sentencepiece_missing_model(tmp_path, sp_dir):
    meta = tk.SentencePieceTokenizer(str(sp_dir / "tokenizer.model")).meta()
    with pytest.raises(UserError) as e:
        tk.load_tokenizer(meta, str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "tokenizer.model") in msg
    assert "python data/prepare.py --tokenizer sentencepiece" in msg and "\n" not in msg


def test_sentencepiece_model_mismatch(tmp_path, sp_dir):
    meta = tk.SentencePieceTokenizer(str(sp_dir / "tokenizer.model")).meta()
    tk.train_sentencepiece(CORPUS[:20], str(tmp_path / "tokenizer"), 310)
    with pytest.raises(UserError, match="sha256 differs"):
        tk.load_tokenizer(meta, str(tmp_path))


# -----------------------------------------------------------------------------
# tiktoken


def test_tiktoken_mask_appended():
    enc = tiny_tiktoken_encoding()
    tok = tk.TiktokenTokenizer(enc)
    assert tok.eot_id == 260 and tok.mask_id == enc.n_vocab == 261 and tok.vocab_size == 262
    assert tok.encode("def") == [259]  # the merges are used


def test_tiktoken_bad_cache_is_a_user_error(monkeypatch):
    """tiktoken raises ValueError for a cached file with an unexpected hash: one line, not a traceback."""
    import tiktoken

    def bad_hash(name):
        raise ValueError("Hash mismatch for data downloaded from https://example/gpt2 (expected abc)")

    monkeypatch.setattr(tiktoken, "get_encoding", bad_hash)
    with pytest.raises(UserError, match="delete the cached file"):
        tk.get_tiktoken("gpt2")


def test_unreadable_sentencepiece_model_is_a_user_error(monkeypatch, sp_dir):
    def no_permission(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tk, "open", no_permission, raising=False)  # the module's open, not the builtin
    with pytest.raises(UserError, match="cannot read sentencepiece model .*Permission denied"):
        tk.SentencePieceTokenizer(str(sp_dir / "tokenizer.model"))


def test_tiktoken_offline_error(monkeypatch, tmp_path):
    """No real network: get_encoding is replaced by one that fails like an offline download."""
    import requests
    import tiktoken

    def offline(name):
        raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError) as e:
        tk.get_tiktoken("gpt2")
    msg = str(e.value)
    assert "could not load tiktoken encoding 'gpt2'" in msg and "TIKTOKEN_CACHE_DIR" in msg
    assert "--tokenizer byte/sentencepiece" in msg and "\n" not in msg
    with pytest.raises(UserError):
        tk.load_tokenizer({"kind": "tiktoken", "encoding": "gpt2"})


def test_tiktoken_unknown_encoding_is_not_reloadable():
    meta = tk.TiktokenTokenizer(tiny_tiktoken_encoding()).meta()
    with pytest.raises(UserError, match="unknown tiktoken encoding 'tiny-test'"):
        tk.load_tokenizer(meta)


# -----------------------------------------------------------------------------
# token files


def test_token_dtype():
    assert tk.token_dtype(258) == "uint16"
    assert tk.token_dtype(65536) == "uint16"  # ids 0..65535
    assert tk.token_dtype(65537) == "uint32"
    assert tk.token_dtype(100278) == "uint32"


@pytest.mark.parametrize("dtype_name,ids", [("uint16", [0, 1, 256, 65535]),
                                            ("uint32", [0, 70000, 2**32 - 1])])
def test_write_and_load_tokens(tmp_path, dtype_name, ids):
    path = tmp_path / "t.bin"
    with open(path, "wb") as f:
        tk.write_tokens(f, ids[:2], dtype_name)
        tk.write_tokens(f, ids[2:], dtype_name)
    assert path.stat().st_size == len(ids) * (2 if dtype_name == "uint16" else 4)
    data = tk.load_tokens(str(path), dtype_name)
    assert data.shape == (len(ids),) and data.long().tolist() == ids
    assert data[1:3].long().tolist() == ids[1:3]
    (tmp_path / "empty.bin").write_bytes(b"")
    assert tk.load_tokens(str(tmp_path / "empty.bin"), dtype_name).numel() == 0


def test_load_tokens_errors(tmp_path):
    with pytest.raises(UserError, match="run `python data/prepare.py`"):
        tk.load_tokens(str(tmp_path / "train.bin"), "uint16")
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UserError, match="not a multiple of 2"):
        tk.load_tokens(str(tmp_path / "odd.bin"), "uint16")
    with pytest.raises(UserError, match="unknown token dtype"):
        tk.load_tokens(str(tmp_path / "odd.bin"), "int8")

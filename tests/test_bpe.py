"""pretrained/bpe.py: a real model's byte-level BPE tokenizer, against a reference BPE with Hugging
Face semantics trained here (and the tokenizers library when installed), offline, in seconds."""
import collections
import json
import os
import random

import pytest

import pretrained
import pretrained.bpe as pbpe
from errors import UserError


# ---------------------------------------------------------------------------------------------
# A tiny byte-level BPE trained here, and a reference BPE with Hugging Face semantics

CORPUS = (
    "def square(x):\n    return x * x\n\nfor i in range(10):\n    print(i, square(i))\n"
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs 123 km.\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n"
    "日本語のテキストと中文文本 and émojis 🙂👍🏽 with café and naïve résumé.\n"
    "    indented    spaces\t\ttabs\n\n\nnewlines 2024-05-17 3.14159 x = [1, 2, 3]\n"
) * 3
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|reserved_0|>"]
CHAT_TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + "
                 "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                 "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
                 "{%- endif %}{%- endif %}")
TEXTS = [
    "", " ", "\n", "def f(x):\n    return x + 1\n", "  leading and trailing spaces  ",
    "The fox's dog'll run; it's 42 km/h (or 26.1 mph)!", "a\r\nb\rc\td\x0be\x0cf", "x" * 50,
    "caf\u00e9 cafe\u0301 \u65e5\u672c\u8a9e \U0001f642\U0001f44d\U0001f3fd \u0915\u094d\u0937",
    "\ufeffBOM \u00a0nbsp \u2028line-sep \u3000ideographic \U0010ffff\ue000",
    "numbers 1234567 and 3.14159 and \u0663\u0664 and \u00bd", "    \n\n\t\t  \n   x", "<|endoftext|> literal <think>",
    "Ünïcödé ÀÉÎÕÜ ß ﬁ ǅ Ω ℌ", "mixed\u200bzero\u200dwidth", "tab\tsep\tvalues\n1\t2\t3\n", "ctrl\x04char\x00",
]
VARIANTS = ("gpt2", "qwen", "smollm", "gaps", "shuffled")


def split_patterns(variant):
    return {"gpt2": [pbpe.GPT2_SPLIT], "shuffled": [pbpe.GPT2_SPLIT], "qwen": [pbpe.QWEN2_SPLIT],
            "smollm": [pbpe.DIGITS_SPLIT, pbpe.GPT2_SPLIT], "gaps": [r"\p{L}+|\p{N}"]}[variant]


def pre_split(text, patterns):
    """Reference pre-tokenization: each pattern splits every piece into matches and the gaps
    between them (tokenizers' Split with behavior Isolated)."""
    import regex

    pieces = [text]
    for p in patterns:
        out = []
        for piece in pieces:
            start = 0
            for m in regex.finditer(p, piece):
                out += [piece[start:m.start()]] if m.start() > start else []
                out += [m.group()] if m.group() else []
                start = m.end()
            out += [piece[start:]] if start < len(piece) else []
        pieces = out
    return pieces


def train_bpe(text, patterns, n_merges):
    """A plain BPE trainer: the most frequent adjacent pair (ties: smallest bytes) becomes a merge."""
    words = collections.Counter(tuple(bytes([b]) for b in p.encode()) for p in pre_split(text, patterns))
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    return merges


def reference_bpe_encode(text, patterns, vocab, merges, normalize=False):
    """Hugging Face BPE semantics: per piece, repeatedly merge the adjacent PAIR of lowest merge
    rank (leftmost on ties); bytes without a token are dropped."""
    import unicodedata

    if normalize:
        text = unicodedata.normalize("NFC", text)
    rank = {pair: r for r, pair in enumerate(merges)}
    ids = []
    for piece in pre_split(text, patterns):
        parts = [bytes([b]) for b in piece.encode() if bytes([b]) in vocab]
        while len(parts) > 1:
            r, i = min((rank.get((parts[i], parts[i + 1]), 1 << 30), i) for i in range(len(parts) - 1))
            if r == 1 << 30:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [vocab[p] for p in parts]
    return ids


def tiny_tokenizer_json(variant="gpt2", n_merges=120, drop_bytes=()):
    """(tokenizer.json dict, vocab {bytes: id}, merges): 256 byte tokens in GPT-2's id order (minus
    drop_bytes), the merges learned on CORPUS, then the added tokens."""
    patterns = split_patterns(variant)
    merges = train_bpe(CORPUS, patterns, n_merges)
    singles = [bytes([pbpe.CHAR_TO_BYTE[c]]) for c in sorted(pbpe.CHAR_TO_BYTE)]
    singles = [b for b in singles if b[0] not in drop_bytes]
    order = singles + [a + b for a, b in merges]
    if variant == "shuffled":  # merge results get ids in reverse merge order: ranks != ids
        order = singles + [a + b for a, b in merges][::-1]
    vocab = {b: i for i, b in enumerate(order)}
    to_str = lambda b: "".join(pbpe.BYTE_TO_CHAR[x] for x in b)  # noqa: E731
    n = len(vocab)
    added = [{"id": n + k, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": c not in ("<think>", "</think>")} for k, c in enumerate(ADDED)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if variant in ("gpt2", "shuffled"):
        pre = byte_level
    elif variant == "smollm":
        pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    else:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": patterns[0]}, "behavior": "Isolated", "invert": False},
            dict(byte_level, use_regex=False)]}
    data = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"} if variant == "qwen" else None, "pre_tokenizer": pre,
        "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                            "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {to_str(b): i for b, i in vocab.items()},
                  "merges": [f"{to_str(a)} {to_str(b)}" for a, b in merges]},
    }
    return data, vocab, merges


def write_tokenizer(folder, variant="gpt2", chat=True, **kw):
    data, vocab, merges = tiny_tokenizer_json(variant, **kw)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"chat_template": CHAT_TEMPLATE} if chat else {}, f)
    return data, vocab, merges


@pytest.fixture(scope="module", params=VARIANTS)
def bpe(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tok_{request.param}")
    drop = (4, 255) if request.param == "smollm" else ()  # like SmolLM2: some bytes have no token
    data, vocab, merges = write_tokenizer(folder, request.param, drop_bytes=drop)
    tok = pbpe.BPETokenizer.from_file(str(folder))  # the folder: tokenizer.json + tokenizer_config.json
    return request.param, folder, tok, vocab, merges


# ---------------------------------------------------------------------------------------------
# Tokenizer tests


def test_bpe_round_trip_and_reference(bpe):
    variant, _, tok, vocab, merges = bpe
    assert tok.kind == "bpe" and tok.vocab_size == len(vocab) + len(ADDED)
    assert (tok._rank_to_id is not None) == (variant == "shuffled")
    for text in TEXTS + [CORPUS]:
        ids = tok.encode(text)
        want = reference_bpe_encode(text, split_patterns(variant), vocab, merges, normalize=variant == "qwen")
        assert ids == want, (variant, text)
        import unicodedata

        expect = unicodedata.normalize("NFC", text) if variant == "qwen" else text
        if variant == "smollm":  # bytes without a token are dropped, as tokenizers does
            expect = expect.replace("\x04", "")
        assert tok.decode(ids) == expect, (variant, text)
    assert len(tok.encode(CORPUS)) < len(CORPUS.encode()) / 2  # the merges do fire


def test_bpe_specials_only_when_asked(bpe):
    _, _, tok, vocab, _ = bpe
    n = len(vocab)
    text = "a<|im_start|>user\nhi<|im_end|><think>x</think><|endoftext|>"
    plain = tok.encode(text)
    assert all(i < n for i in plain) and tok.decode(plain) == text
    special = tok.encode(text, allow_special=True)
    assert [i for i in special if i >= n] == [n + 1, n + 2, n + 3, n + 4, n + 0]
    assert tok.decode(special) == text
    assert tok.eot_id == n and tok.mask_id == n + 5  # no padded row: the reserved added token
    assert "reserved" in tok.mask_choice and tok.end_of_turn_id == n + 2


def test_bpe_chat_format(bpe):
    _, _, tok, _, _ = bpe
    assert tok.chat_format == {"style": "chatml", "default_system": None, "think_off": True}
    rendered = "<|im_start|>user\nhi <|im_end|> there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids, eot = pretrained.chat_prompt(tok, "hi <|im_end|> there")
    n_im_end = tok.token_id("<|im_end|>")
    assert eot == n_im_end and ids.count(n_im_end) == 1  # the marker inside the prompt stays text
    assert tok.decode(ids) == rendered


def test_bpe_meta_round_trip(bpe, tmp_path):
    _, folder, tok, _, _ = bpe
    meta = tok.meta()
    json.dumps(meta)
    again = pbpe.load_any_tokenizer(meta)
    assert again.meta() == meta and again.encode(CORPUS) == tok.encode(CORPUS)
    with pytest.raises(UserError, match="tokenizer file is gone"):
        pbpe.load_any_tokenizer(dict(meta, path=str(tmp_path / "nope.json"), file="nope.json"), str(tmp_path))


def test_bpe_to_tokenizer_json_round_trip(bpe):
    _, _, tok, _, _ = bpe
    again = pbpe.BPETokenizer.from_tokenizer_json(tok.to_tokenizer_json())
    for text in TEXTS + [CORPUS]:
        assert again.encode(text, allow_special=True) == tok.encode(text, allow_special=True)


def test_bpe_mask_is_first_padded_row(tmp_path):
    data, vocab, _ = write_tokenizer(tmp_path)
    n = len(vocab) + len(ADDED)
    tok = pbpe.BPETokenizer.from_file(str(tmp_path / "tokenizer.json"), vocab_size=n + 7)
    assert tok.mask_id == n and "padded" in tok.mask_choice and tok.vocab_size == n + 7
    assert tok.decode([tok.mask_id, n + 3, 5]) == "<|mask|><|unused_%d|>" % (n + 3) + tok.decode([5])


def test_tokenizers_library_parity(bpe):
    tokenizers = pytest.importorskip("tokenizers")
    variant, folder, tok, _, _ = bpe
    ref = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    rng = random.Random(0)
    pool = list("abcxyz_():=+-*/'\"#0123456789日本🙂é") + [" ", "  ", "    ", "\n", "\t", "\r\n", "'s", "'LL"]
    texts = TEXTS + [CORPUS] + ["".join(rng.choice(pool) for _ in range(rng.randint(0, 60))) for _ in range(200)]
    for text in texts:
        plain = text.replace("<|endoftext|>", "").replace("<think>", "")  # tokenizers always matches those
        assert tok.encode(plain) == ref.encode(plain, add_special_tokens=False).ids, (variant, plain)
        assert tok.encode(text, allow_special=True) == ref.encode(text, add_special_tokens=False).ids, (variant, text)


@pytest.mark.parametrize("bad, match", [
    ({"model": {"type": "WordPiece", "vocab": {"a": 0}}}, "not BPE"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [], "byte_fallback": True}, "decoder": None,
      "pre_tokenizer": {"type": "Metaspace"}}, "byte_fallback"),
    ({"model": {"type": "BPE", "vocab": {"▁a": 0}, "merges": []}, "decoder": {"type": "Metaspace"},
      "pre_tokenizer": {"type": "Metaspace"}}, "not ByteLevel"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "decoder": {"type": "ByteLevel"},
      "pre_tokenizer": {"type": "Whitespace"}}, "not supported"),
])
def test_tokenizer_json_refusals(tmp_path, bad, match):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(UserError, match=match) as e:
        pbpe.BPETokenizer.from_file(str(path))
    assert "\n" not in str(e.value)

"""Tokenizers: one small interface over byte, sentencepiece and tiktoken (and pretrained/bpe.py).

Every tokenizer has `kind`, `vocab_size` (special ids included), `eot_id` (end of text, put
between documents) and `mask_id` (the MASK token of the diffusion head: the base model never
sees it as input or target, and `encode` never produces it). `encode(text)` returns a list of
ids and never emits eot/mask; `decode(ids)` inverts it exactly for any valid `str`.
`meta()` is a dict of plain JSON types that `load_tokenizer(meta, base_dir)` rebuilds the
tokenizer from; it is stored in checkpoints (torch.load(weights_only=True)) and in data meta.json.

  byte          ids 0..255 are UTF-8 bytes, 256 = end of text, 257 = MASK (vocab 258).
  sentencepiece a BPE model trained here on the training split by `train_sentencepiece`, with
                byte fallback so every string is encodable; eot and MASK are control symbols.
  tiktoken      a named encoding such as "gpt2" (downloaded once into the tiktoken cache); its
                own <|endoftext|> is eot, and MASK is one new id appended after its vocabulary.
  bpe           a pretrained model's own byte-level BPE: pretrained/bpe.py, same interface.

Special strings: text that contains "<|endoftext|>" or "<|mask|>" literally is encoded as
ordinary text (those characters), never as the special ids, so a document that mentions the
marker cannot end itself early. `decode` renders the special ids as those same strings.

Token files (train.bin / val.bin) are raw little-endian uint16 (uint32 when the vocabulary does
not fit); `write_tokens` writes them and `load_tokens` memory-maps them with torch.
"""
import array
import hashlib
import io
import os
import re
import sys

import sentencepiece as spm
import tiktoken
import torch

from errors import UserError, first_line

EOT_STRING = "<|endoftext|>"
MASK_STRING = "<|mask|>"
# U+2581: sentencepiece's stand-in for a space; a literal one in the text needs care (see below).
SP_SPACE = "\u2581"


def _check_encodable(text):
    """Raise a clear UserError for a character that has no UTF-8 form (a lone surrogate)."""
    if not isinstance(text, str):
        raise TypeError(f"encode expects a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        ch = text[e.start]
        raise UserError(
            f"cannot encode character {ch!r} (U+{ord(ch):04X}) at index {e.start}: a lone surrogate "
            f"is not valid Unicode text; remove it or clean the text first, e.g. "
            f"text.encode('utf-8', 'replace').decode('utf-8')"
        ) from None


def _as_id_list(ids):
    """Accept a list/tuple of ints or a torch tensor of ids; return a list of Python ints."""
    if isinstance(ids, torch.Tensor):
        return ids.reshape(-1).tolist()
    return [int(i) for i in ids]


class Tokenizer:
    """Shared decode logic; subclasses implement `encode`, `_decode_run` and `meta`."""

    kind = None

    def decode(self, ids):
        """Decode ids to text; eot and MASK ids appear as "<|endoftext|>" and "<|mask|>"."""
        specials = {self.eot_id: EOT_STRING, self.mask_id: MASK_STRING}
        out, run = [], []
        for i in _as_id_list(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is out of range for this {self.kind} tokenizer "
                    f"(vocab_size {self.vocab_size})"
                )
            if i in specials:
                # Decode ordinary ids run by run, so a stream cut mid-character just before a
                # special id turns into U+FFFD instead of swallowing the special marker.
                out.append(self._decode_run(run))
                out.append(specials[i])
                run = []
            else:
                run.append(i)
        out.append(self._decode_run(run))
        return "".join(out)

    def _common_meta(self):
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                "mask_id": self.mask_id}

    def __repr__(self):
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, eot_id={self.eot_id}, "
                f"mask_id={self.mask_id})")


# -----------------------------------------------------------------------------
# byte


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then end of text (256) and MASK (257)."""

    kind = "byte"

    def __init__(self):
        self.eot_id = 256
        self.mask_id = 257
        self.vocab_size = 258

    def encode(self, text):
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError:
            _check_encodable(text)  # raises the clear message
            raise

    def _decode_run(self, ids):
        # errors="replace": a generated stream may stop in the middle of a multi-byte character.
        return bytes(ids).decode("utf-8", errors="replace")

    def meta(self):
        return self._common_meta()


# -----------------------------------------------------------------------------
# sentencepiece

# ids 0..3 are <unk>, eot, MASK and "\n"; then the 256 byte-fallback pieces; then the merges.
SP_MIN_VOCAB = 4 + 256 + 1


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece BPE model from `train_sentencepiece`, loaded from its .model file."""

    kind = "sentencepiece"

    def __init__(self, model_file, model_bytes=None):
        """model_bytes: the .model file's content (checkpoints carry it, so they are self-contained);
        when given, model_file is only the name recorded in meta."""
        if model_bytes is None:
            if not os.path.isfile(model_file):
                raise UserError(
                    f"sentencepiece model {model_file} not found: run "
                    f"`python data/prepare.py --tokenizer sentencepiece ...` to train it"
                )
            try:
                with open(model_file, "rb") as f:
                    model_bytes = f.read()
            except OSError as e:  # a folder, no permission
                raise UserError(f"cannot read sentencepiece model {model_file} ({e.strerror or type(e).__name__})") from None
        self.model_bytes = model_bytes
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        self.vocab_size = self.sp.get_piece_size()
        self.eot_id = self.sp.piece_to_id(EOT_STRING)
        self.mask_id = self.sp.piece_to_id(MASK_STRING)
        for name, i in ((EOT_STRING, self.eot_id), (MASK_STRING, self.mask_id)):
            # piece_to_id answers unk (0) for a missing piece; a control symbol is never produced
            # by encode, which is the property we rely on.
            if i == self.sp.unk_id() or not self.sp.is_control(i):
                raise UserError(
                    f"sentencepiece model {model_file} has no {name} control symbol; "
                    f"train it with tokenizer.train_sentencepiece (python data/prepare.py)"
                )
        # The three byte pieces that spell U+2581 (see encode).
        self._sp_space_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in SP_SPACE.encode()]

    def encode(self, text):
        _check_encodable(text)
        # sentencepiece writes spaces as U+2581 internally and decodes every U+2581 back to a
        # space, so a literal U+2581 in the text would come back as " ". We cut the text at
        # literal U+2581s and spell each one with its three byte-fallback pieces, which decode
        # to the character itself. Everything else is round-trip safe thanks to the identity
        # normalizer, no dummy prefix, kept whitespace and byte fallback.
        parts = text.split(SP_SPACE)
        ids = []
        for k, part in enumerate(parts):
            if k:
                ids.extend(self._sp_space_ids)
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def _decode_run(self, ids):
        # Invalid byte-fallback sequences (a cut stream) decode to U+FFFD inside sentencepiece.
        return self.sp.decode(ids) if ids else ""

    def meta(self):
        m = self._common_meta()
        # Only the file name: the model sits next to the data (or checkpoint) it belongs to.
        m["model_file"] = os.path.basename(self.model_file)
        m["model_sha256"] = hashlib.sha256(self.model_bytes).hexdigest()
        return m


def _training_lines(text_iter_or_file, max_lines):
    """Lines to train sentencepiece on: every line of the text, evenly thinned to max_lines."""
    if isinstance(text_iter_or_file, (str, os.PathLike)):
        with open(text_iter_or_file, encoding="utf-8") as f:
            texts = [f.read()]
    else:
        texts = text_iter_or_file
    lines = []
    for text in texts:
        for line in text.split("\n"):
            # sentencepiece trains line by line ("\n" is added as a symbol of its own) and would
            # learn a literal U+2581 as a space, so cut lines there too, as encode does.
            lines.extend(p for p in line.split(SP_SPACE) if p)
    if len(lines) > max_lines:
        # Deterministic and spread over the whole corpus (not just its first files).
        lines = [lines[i * len(lines) // max_lines] for i in range(max_lines)]
    return lines


def train_sentencepiece(text_iter_or_file, model_prefix, vocab_size, max_lines=300_000):
    """Train a BPE sentencepiece model suited to source code; write `{model_prefix}.model`.

    text_iter_or_file: a path to a UTF-8 text file, or an iterable of str (documents or lines).
    Training is deterministic: the same text and vocab_size give the same model bytes (one
    thread, no random sentence sampling: we thin the lines ourselves). The model may end up
    with fewer than vocab_size pieces when the text is too small to learn that many merges.
    """
    if vocab_size < SP_MIN_VOCAB:
        raise UserError(
            f"sentencepiece vocab size {vocab_size} is too small: 256 byte pieces and 4 special "
            f"pieces take 260 ids, so use at least {SP_MIN_VOCAB} (a few thousand is typical)"
        )
    lines = _training_lines(text_iter_or_file, max_lines)
    if not lines:
        raise UserError("cannot train sentencepiece on an empty text")
    writer = io.BytesIO()  # writing via model_writer keeps model_prefix out of the model bytes
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=writer,
            model_type="bpe",
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # small corpora: stop early instead of failing
            byte_fallback=True,  # every string is encodable; no <unk> is ever produced
            character_coverage=0.9995,  # the rarest characters go through byte fallback
            normalization_rule_name="identity",  # keep the text exactly (round trip)
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,  # indentation runs become single pieces
            split_digits=True,  # numbers stay compositional in code
            max_sentence_length=1 << 16,  # long source lines are kept, not silently dropped
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            control_symbols=[EOT_STRING, MASK_STRING],  # ids 1, 2; never produced by encode
            user_defined_symbols=["\n"],  # id 3; training is per line, so add newline by hand
            num_threads=1,
            minloglevel=2,  # quiet: warnings and errors only
        )
    except RuntimeError as e:
        m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
        if m:
            raise UserError(
                f"sentencepiece vocab size {vocab_size} is too small for this corpus: its "
                f"characters alone need {m.group(2)} ids; use a larger vocab size"
            ) from None
        raise UserError(f"sentencepiece training failed: {first_line(e)}") from None
    path = f"{model_prefix}.model"
    with open(path, "wb") as f:
        f.write(writer.getvalue())
    return SentencePieceTokenizer(path)


# -----------------------------------------------------------------------------
# tiktoken


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding plus one new MASK id appended after its vocabulary.

    Takes an already built `tiktoken.Encoding` (tests build a tiny one locally, with no
    network); `get_tiktoken(name)` builds one by name. Only named encodings can be rebuilt from
    meta: an Encoding built in code is stored by its name, and load_tokenizer refuses names that
    tiktoken does not know.
    """

    kind = "tiktoken"

    def __init__(self, enc):
        self.name = enc.name
        self.eot_id = enc._special_tokens.get(EOT_STRING)
        if self.eot_id is None:
            raise UserError(f"tiktoken encoding '{enc.name}' has no {EOT_STRING} token")
        self.mask_id = enc.n_vocab  # one past every existing id (ordinary or special)
        self.vocab_size = enc.n_vocab + 1
        self.enc = tiktoken.Encoding(
            name=f"{enc.name}+mask",
            pat_str=enc._pat_str,
            mergeable_ranks=enc._mergeable_ranks,
            special_tokens={**enc._special_tokens, MASK_STRING: self.mask_id},
        )

    def encode(self, text):
        _check_encodable(text)  # tiktoken would silently turn a lone surrogate into U+FFFD
        return self.enc.encode_ordinary(text)  # special strings are ordinary text here

    def _decode_run(self, ids):
        return self.enc.decode(ids, errors="replace")

    def meta(self):
        m = self._common_meta()
        m["encoding"] = self.name
        return m


def get_tiktoken(name):
    """The tiktoken encoding `name` (e.g. "gpt2") with a MASK id added; clear error offline."""
    if name not in tiktoken.list_encoding_names():
        raise UserError(
            f"unknown tiktoken encoding '{name}' (known: {', '.join(tiktoken.list_encoding_names())})"
        )
    try:
        enc = tiktoken.get_encoding(name)
    except OSError as e:  # requests' ConnectionError and friends are OSErrors too
        raise UserError(
            f"could not load tiktoken encoding '{name}': no network and no local tiktoken cache "
            f"(set TIKTOKEN_CACHE_DIR to a folder holding it, or use --tokenizer "
            f"byte/sentencepiece) [{type(e).__name__}]"
        ) from None
    except ValueError as e:  # a cached file whose hash tiktoken does not expect
        raise UserError(f"tiktoken encoding '{name}' could not be loaded from its cache ({first_line(e, 120)}); "
                        f"delete the cached file (TIKTOKEN_CACHE_DIR) and fetch it again") from None
    return TiktokenTokenizer(enc)


# -----------------------------------------------------------------------------
# rebuilding from meta


def load_tokenizer(meta, base_dir=None, model_bytes=None):
    """Rebuild the tokenizer described by `meta` (a tokenizer's meta(), or a data meta.json dict
    holding one under "tokenizer"). A sentencepiece model file is looked up in base_dir (the data
    or checkpoint folder; the current directory when None)."""
    if "tokenizer" in meta:
        meta = meta["tokenizer"]
    kind = meta.get("kind")
    if kind == "byte":
        tok = ByteTokenizer()
    elif kind == "sentencepiece":
        path = os.path.join(base_dir or ".", meta["model_file"])
        tok = SentencePieceTokenizer(path, model_bytes)
        want = meta.get("model_sha256")
        if want and want != tok.meta()["model_sha256"]:
            raise UserError(
                f"sentencepiece model {path} is not the one this meta was made with (sha256 "
                f"differs); point to the matching data folder or re-run data/prepare.py"
            )
    elif kind == "tiktoken":
        tok = get_tiktoken(meta["encoding"])
    elif kind == "bpe":  # a pretrained model's: pretrained.bpe.load_any_tokenizer reads it
        raise UserError("a pretrained model's tokenizer (kind bpe) is read by pretrained.bpe.load_any_tokenizer")
    else:
        raise UserError(f"unknown tokenizer kind {kind!r} (expected byte, sentencepiece, tiktoken or bpe)")
    for key in ("vocab_size", "eot_id", "mask_id"):
        if key in meta and meta[key] != getattr(tok, key):
            raise UserError(
                f"rebuilt {kind} tokenizer has {key} {getattr(tok, key)} but meta says {meta[key]}"
            )
    return tok



# -----------------------------------------------------------------------------
# token files

_DTYPES = {"uint16": (torch.uint16, "H", 2), "uint32": (torch.uint32, "I", 4)}


def token_dtype(vocab_size):
    """Name of the smallest unsigned dtype that holds ids 0..vocab_size-1: uint16 or uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _dtype(dtype_name):
    if dtype_name not in _DTYPES:
        raise UserError(f"unknown token dtype {dtype_name!r} (expected uint16 or uint32)")
    return _DTYPES[dtype_name]


def write_tokens(f, ids, dtype_name):
    """Append ids to the open binary file f as raw little-endian dtype_name integers."""
    _, code, itemsize = _dtype(dtype_name)
    a = array.array(code, ids)  # raises OverflowError if an id does not fit
    assert a.itemsize == itemsize, f"array code {code!r} is not {itemsize} bytes on this platform"
    if sys.byteorder == "big":
        a.byteswap()
    a.tofile(f)


def load_tokens(path, dtype_name):
    """Memory-map a token file as a 1-D torch tensor of dtype_name (uint16 or uint32).

    The file is mapped copy-on-write (it is never modified) and read lazily; uint16/uint32
    tensors support little beyond slicing, so convert what you take: `data[i:i+T].long()`.
    """
    dtype, _, itemsize = _dtype(dtype_name)
    if not os.path.isfile(path):
        raise UserError(f"token file {path} not found: run `python data/prepare.py` first")
    if sys.byteorder == "big":
        raise RuntimeError("token files are little-endian; big-endian hosts are not supported")
    nbytes = os.path.getsize(path)
    if nbytes % itemsize:
        raise UserError(f"token file {path} has {nbytes} bytes, not a multiple of {itemsize} "
                         f"({dtype_name}); is the dtype right?")
    n = nbytes // itemsize
    if n == 0:
        return torch.empty(0, dtype=dtype)
    return torch.from_file(path, shared=False, size=n, dtype=dtype)

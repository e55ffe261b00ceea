"""
A pretrained model's own byte-level BPE tokenizer (Qwen, SmolLM2, GPT-2, Llama 3 style), read from
its tokenizer.json or GGUF metadata and run by tiktoken with the model's ids. MASK is a padded
embedding row or a spare added token; added tokens (chat markers) are text unless asked for:
encode(text, allow_special=True), encode_chat.
"""

import hashlib
import json
import os
import unicodedata

import regex  # tiktoken's own dependency: the pre-tokenizers' \p{L} classes
import tiktoken

from errors import UserError, first_line
from tokenizer import EOT_STRING, MASK_STRING, Tokenizer, _as_id_list, _check_encodable, load_tokenizer

# Pre-tokenizer regexes. GPT2_SPLIT is what a tokenizer.json ByteLevel(use_regex=true) applies;
# the others are the Split patterns of Qwen2/Qwen3 and Llama 3 tokenizers (and what llama.cpp
# applies for tokenizer.ggml.pre = qwen2 / llama-bpe). DIGITS_SPLIT is tokenizers' Digits
# pre-tokenizer with individual_digits (SmolLM/StarCoder: every digit is its own piece).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
DIGITS_SPLIT = r"\p{N}"
WHOLE_TEXT = r"[\s\S]+"  # ByteLevel(use_regex=false) alone: the whole text is one piece
# patterns known to match every character (a gap between matches cannot occur)
_COVERING_SPLITS = {GPT2_SPLIT, QWEN2_SPLIT, LLAMA3_SPLIT, WHOLE_TEXT}
# GGUF tokenizer.ggml.pre -> the pre-tokenizer stages llama.cpp applies (same split as tokenizer.json)
GGUF_PRE_SPLITS = {
    "gpt2": [GPT2_SPLIT],
    "smollm": [DIGITS_SPLIT, GPT2_SPLIT],
    "qwen2": [QWEN2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT],
}
# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
_GGUF_NORMAL = 1
_MASK_LIKE = r"(?i)^(<\|?mask\|?>|\[mask\])$"
_RESERVED_LIKE = r"(?i)(reserved|unused)"


def _byte_alphabet():
    """GPT-2's byte-level alphabet: byte b <-> one printable unicode character. Printable Latin-1
    bytes stand for themselves; the other 68 bytes map to U+0100 onward, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = dict((b, chr(b)) for b in printable)
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _unicode_to_bytes(token: str, where: str) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in token)
    except KeyError as e:
        raise UserError(f"{where}: vocabulary entry {token!r} has character {e.args[0]!r} outside GPT-2's "
                        f"byte-level alphabet, so this is not a byte-level BPE tokenizer (only those are "
                        f"supported; use the model's tokenizer.json from a Qwen/SmolLM2/GPT-2/Llama-3 style model)") from None


def _merge_pair(entry, where: str) -> tuple:
    """A merge as the files store it ("a b" in tokenizer.json or GGUF metadata, or ["a", "b"] in
    newer tokenizer.json files) -> (bytes, bytes). Byte-level tokens never hold a space (it is Ġ),
    so a string merge is exactly two tokens around one space."""
    parts = entry.split(" ") if isinstance(entry, str) else entry
    if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise UserError(f"{where}: merge {entry!r} is not two tokens separated by a space; the tokenizer "
                        "file is damaged (copy it again from the model's release)")
    return _unicode_to_bytes(parts[0], where), _unicode_to_bytes(parts[1], where)


class BPETokenizer(Tokenizer):
    """A pretrained model's byte-level BPE, run by tiktoken, rebuilt from the model's own files
    (tokenizer.json or GGUF metadata; see `from_file`).

    Same behaviour as Hugging Face `tokenizers` on the same file: the pre-tokenizer stages split
    the text (all but the last stage here, in Python; the last one inside tiktoken), then BPE
    merges each piece in merge order. tiktoken ranks a merge by the bytes it produces, which equals
    the pair rank of a BPE vocabulary whose merges were learned in order (the tests check it
    against `tokenizers` and against a reference BPE). Ids are the model's ids.

    Added tokens (<|im_start|>, <think>, ...) are never produced from plain text: `encode(text)`
    spells their characters as ordinary text; `encode(text, allow_special=True)` matches them,
    as Hugging Face does by default. `encode_chat(prompt)` builds a chat prompt with them.

    `vocab_size` is the model's embedding size, which may exceed the tokenizer (Qwen3 pads 151669
    tokens to 151936 rows). `mask_id` is an id no text produces: the first padded row when there is
    one (what the official Orthrus checkpoints use), else an added special token the text and the
    chat format never use (see `mask_choice`). With an NFC normalizer (Qwen) the text is NFC
    normalised first, so decode(encode(text)) == NFC(text), which is `text` for most text. Bytes
    the vocabulary has no token for (SmolLM2: 6 control characters such as \\x04, and lead bytes
    of invalid or unassigned UTF-8; see `missing_bytes`) are dropped, as tokenizers drops them.
    """

    kind = "bpe"

    def __init__(self, *, tokens: dict, merges: list, added: dict, splits: list, normalizer=None,
                 vocab_size=None, mask_id=None, eot_id=None, special_ids=None, chat_template=None,
                 name="bpe", path=None):
        """tokens: {id: bytes} ordinary tokens; merges: [(bytes, bytes)] in priority order;
        added: {id: str} added/special tokens; splits: pre-tokenizer regexes, applied in turn;
        special_ids: {"bos"/"eos"/"pad"/"unk"/"eot": id} as the model's files name them."""
        self.name, self.path = name, path
        self.splits, self.normalizer = list(splits), normalizer
        self.chat_template = chat_template
        self.special_ids = {k: int(v) for k, v in (special_ids or {}).items() if v is not None}
        self._tokens, self._added = dict(tokens), dict(added)
        self._merges = [(bytes(a), bytes(b)) for a, b in merges]
        where = name
        n_tokens = 1 + max([*self._tokens, *self._added])
        self.n_tokens = n_tokens  # ids 0..n_tokens-1 are tokens; above are padded embedding rows
        self.vocab_size = int(vocab_size or n_tokens)
        if self.vocab_size < n_tokens:
            raise UserError(f"{where}: the tokenizer has {n_tokens} tokens but the model's vocabulary has only "
                            f"{self.vocab_size} rows; tokenizer and model do not belong together")
        # id -> bytes for decoding (None: an added token or a padded row, rendered as a string)
        self._id_bytes = [None] * self.vocab_size
        for i, b in self._tokens.items():
            self._id_bytes[i] = b

        # mergeable ranks for tiktoken: the 256 single bytes and every merge result
        byte_id = {}
        bytes_id = {}
        for i in sorted(self._tokens):
            b = self._tokens[i]
            bytes_id.setdefault(b, i)
            if len(b) == 1:
                byte_id.setdefault(b[0], i)
        # Bytes without a token (SmolLM2 has none for 21 bytes: 6 control characters, and lead
        # bytes of invalid or unassigned UTF-8) are dropped from the encoding, as tokenizers does.
        self.missing_bytes = [b for b in range(256) if b not in byte_id]
        if len(self.missing_bytes) > 64:
            raise UserError(f"{where}: the vocabulary lacks {len(self.missing_bytes)} of the 256 single-byte tokens; "
                            f"not a byte-level BPE vocabulary")
        merge_ids, seen = [], set()
        for a, b in merges:
            t = a + b
            i = bytes_id.get(t)
            if i is None:
                raise UserError(f"{where}: merge {a!r} + {b!r} makes a token missing from the vocabulary; "
                                f"the tokenizer file is damaged")
            if t not in seen:  # a second merge yielding the same bytes never fires in tiktoken
                seen.add(t)
                merge_ids.append((t, i))
        self.n_merges = len(merge_ids)
        in_order = all(x[1] < y[1] for x, y in zip(merge_ids, merge_ids[1:]))
        if in_order:  # ids follow the merge order (usual): tiktoken ranks are the ids themselves
            ranks = {bytes([b]): i for b, i in byte_id.items()}
            ranks.update(merge_ids)
            ranks.update((bytes([b]), self.vocab_size + b) for b in self.missing_bytes)  # dropped below
            self._rank_to_id = None
        else:  # rank = merge priority; map tiktoken's output back to the model's ids
            ranks = {bytes([b]): b for b in range(256)}
            ranks.update((t, 256 + k) for k, (t, _) in enumerate(merge_ids))
            self._rank_to_id = [byte_id.get(b) for b in range(256)] + [i for _, i in merge_ids]
        last = self.splits[-1] if self.splits else WHOLE_TEXT
        if last not in _COVERING_SPLITS:
            # tiktoken drops text between regex matches; tokenizers keeps it as a piece: add the gap
            last = f"(?:{last})|(?:(?!(?:{last}))[\\s\\S])+"
        try:
            self._pre = [regex.compile(p) for p in self.splits[:-1]]
            self.enc = tiktoken.Encoding(name=f"{name}-bpe", pat_str=last, mergeable_ranks=ranks, special_tokens={})
        except (regex.error, ValueError) as e:
            raise UserError(f"{where}: cannot use its pre-tokenizer regex ({first_line(e, 120)})") from None
        # added tokens, longest first so that a token containing another one wins
        self._added_ids = {c: i for i, c in sorted(self._added.items(), reverse=True)}
        alternatives = sorted(self._added_ids, key=len, reverse=True)
        self._added_re = regex.compile("|".join(regex.escape(c) for c in alternatives)) if alternatives else None

        # end of text: <|endoftext|> when the vocabulary has one, else the model's eos
        self.eot_id = eot_id if eot_id is not None else self._added_ids.get(
            EOT_STRING, self.special_ids.get("eot", self.special_ids.get("eos")))
        if self.eot_id is None:
            raise UserError(f"{where}: no end-of-text token (no {EOT_STRING} and no eos id); cannot use this tokenizer")
        self.chat_format = self._parse_chat_template(chat_template)
        self.end_of_turn_id = self._added_ids.get("<|im_end|>") if self.chat_format else None
        if mask_id is None:
            mask_id, self.mask_choice = self._choose_mask_id()
        else:
            self.mask_choice = f"id {mask_id} (given)"
        if not 0 <= mask_id < self.vocab_size or self._id_bytes[mask_id] is not None:
            raise UserError(f"{where}: MASK id {mask_id} must be an added token or a padded row below "
                            f"{self.vocab_size}, never an ordinary token that text produces")
        self.mask_id = int(mask_id)
        self._content_sha256 = None

    # ---- MASK and chat format ------------------------------------------------------------

    def _reserved_ids(self):
        """Ids with a role: the model's named specials and the chat format's markers."""
        ids = set(self.special_ids.values()) | {self.eot_id}
        for c in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", EOT_STRING):
            if c in self._added_ids:
                ids.add(self._added_ids[c])
        return ids

    def _choose_mask_id(self):
        if self.vocab_size > self.n_tokens:
            i = self.n_tokens
            return i, (f"id {i}, the first padded embedding row (the model has {self.vocab_size} rows, the "
                       f"tokenizer {self.n_tokens} tokens): no text can produce it (official Orthrus choice)")
        free = [(i, c) for i, c in sorted(self._added.items()) if i not in self._reserved_ids()]
        for pattern, why in ((_MASK_LIKE, "the tokenizer's own mask token"),
                             (_RESERVED_LIKE, "the last reserved/unused added token")):
            hits = [(i, c) for i, c in free if regex.search(pattern, c)]
            if hits:
                i, c = hits[-1]
                return i, f"id {i} {c!r}, {why}: added tokens never come from plain text"
        if free:
            i, c = free[-1]
            return i, (f"id {i} {c!r}, the last added token without a role (not bos/eos/pad/eot, not a chat "
                       f"marker): added tokens never come from plain text, and the model has no padded row")
        raise UserError(f"{self.name}: no id can serve as MASK: the model has no padded embedding row and no spare "
                        f"added token; pass mask_id= explicitly")

    def _parse_chat_template(self, template):
        """ChatML (<|im_start|>role\\n...<|im_end|>\\n) when the template uses it and the tokens exist;
        its default system prompt (SmolLM2) and Qwen3's thinking switch are read off the template."""
        if isinstance(template, list):  # tokenizer_config.json may hold [{"name", "template"}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if not isinstance(template, str) or "<|im_start|>" not in template:
            return None
        if "<|im_start|>" not in self._added_ids or "<|im_end|>" not in self._added_ids:
            return None
        m = regex.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}<\\]+)<\|im_end\|>", template)
        think_off = "enable_thinking" in template and "<think>" in self._added_ids and "</think>" in self._added_ids
        return {"style": "chatml", "default_system": m.group(1) if m else None, "think_off": think_off}

    def encode_chat(self, prompt: str, system=None) -> list:
        """Ids of one user turn and the opening of the assistant's reply, as the model's chat
        template renders them (Qwen3: thinking off, i.e. an empty <think></think> block; SmolLM2:
        its default system prompt). The prompt is ordinary text: markers inside it stay text."""
        if self.chat_format is None:
            raise UserError(f"{self.name} has no chat format this code knows (ChatML); drop --chat and give a plain prompt")
        _check_encodable(prompt)
        S = self._added_ids
        system = self.chat_format["default_system"] if system is None else system
        ids = []
        if system is not None:
            ids += [S["<|im_start|>"], *self.encode("system\n" + system), S["<|im_end|>"], *self.encode("\n")]
        ids += [S["<|im_start|>"], *self.encode("user\n" + prompt), S["<|im_end|>"], *self.encode("\n")]
        ids += [S["<|im_start|>"], *self.encode("assistant\n")]
        if self.chat_format["think_off"]:
            ids += [S["<think>"], *self.encode("\n\n"), S["</think>"], *self.encode("\n\n")]
        return ids

    # ---- encode / decode -------------------------------------------------------------------

    def encode(self, text, allow_special=False):
        _check_encodable(text)
        if self.normalizer == "NFC":
            text = unicodedata.normalize("NFC", text)
        if not allow_special or self._added_re is None:
            return self._encode_ordinary(text)
        ids, start = [], 0
        for m in self._added_re.finditer(text):
            ids += self._encode_ordinary(text[start:m.start()])
            ids.append(self._added_ids[m.group()])
            start = m.end()
        return ids + self._encode_ordinary(text[start:])

    def _encode_ordinary(self, text):
        if not text:
            return []
        pieces = [text]
        for pattern in self._pre:  # HF Split(behavior=Isolated): matches and the gaps between them
            split = []
            for piece in pieces:
                start = 0
                for m in pattern.finditer(piece):
                    if m.start() > start:
                        split.append(piece[start:m.start()])
                    if m.end() > m.start():
                        split.append(m.group())
                    start = m.end()
                if start < len(piece):
                    split.append(piece[start:])
            pieces = split
        if len(pieces) == 1:
            ranks = self.enc.encode_ordinary(pieces[0])
        else:
            ranks = [r for piece in pieces for r in self.enc.encode_ordinary(piece)]
        if self._rank_to_id is not None:
            ranks = [self._rank_to_id[r] for r in ranks]
            return [i for i in ranks if i is not None] if self.missing_bytes else ranks
        return [r for r in ranks if r < self.vocab_size] if self.missing_bytes else ranks

    def decode(self, ids):
        """Text of the ids; added tokens appear as their own strings, a padded MASK row as
        "<|mask|>" and any other padded row as "<|unused_ID|>". Ordinary ids are decoded run by run
        with U+FFFD for a cut multi-byte character (a stream may stop mid-character)."""
        out, run = [], []
        for i in _as_id_list(ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range for this {self.kind} tokenizer "
                                 f"(vocab_size {self.vocab_size})")
            b = self._id_bytes[i]
            if b is not None:
                run.append(b)
                continue
            out.append(b"".join(run).decode("utf-8", errors="replace"))
            run = []
            if i in self._added:
                out.append(self._added[i])
            else:
                out.append(MASK_STRING if i == self.mask_id else f"<|unused_{i}|>")
        out.append(b"".join(run).decode("utf-8", errors="replace"))
        return "".join(out)

    def _decode_run(self, ids):  # the base class's hook, for completeness
        return self.decode(ids)

    def token_id(self, content: str):
        """Id of an added token by its string (e.g. "<|im_end|>"), or None."""
        return self._added_ids.get(content)

    # ---- serialisation ---------------------------------------------------------------------

    def content_sha256(self) -> str:
        """A hash of everything that decides encode/decode (tokens, merges, added tokens, split
        patterns, normalizer, chat template): equal for the same tokenizer from any file."""
        if self._content_sha256 is None:
            h = hashlib.sha256()
            for i in sorted(self._tokens):
                h.update(b"t%d:%s;" % (i, self._tokens[i].hex().encode()))
            for a, b in self._merges:
                h.update(b"m%s,%s;" % (a.hex().encode(), b.hex().encode()))
            for i in sorted(self._added):
                h.update(f"a{i}:{self._added[i]!r};".encode())
            h.update(repr((self.splits, self.normalizer, self.chat_template)).encode())
            self._content_sha256 = h.hexdigest()
        return self._content_sha256

    def meta(self):
        m = self._common_meta()
        m["file"] = os.path.basename(self.path) if self.path else None
        m["path"] = os.path.abspath(self.path) if self.path else None
        m["sha256"] = self.content_sha256()
        return m

    def to_tokenizer_json(self) -> dict:
        """An equivalent Hugging Face tokenizer.json (as a dict): lets a GGUF-only tokenizer be
        exported, and tested against `tokenizers`."""
        return tokenizer_json(self._tokens, self._merges, self._added, self.splits, self.normalizer)

    # ---- constructors ----------------------------------------------------------------------

    @classmethod
    def from_tokenizer_json(cls, data, *, chat_template=None, path=None, **kwargs):
        """From a Hugging Face tokenizer.json (a path or the parsed dict). Refuses anything that is
        not byte-level BPE (one line saying why)."""
        where = path or "tokenizer.json"
        if not isinstance(data, dict):
            where, path = data, path or data
            try:
                with open(data, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read tokenizer file {data}: {first_line(e, 120)}") from None
        model = data.get("model") or {}
        if model.get("type", "BPE" if "merges" in model else None) != "BPE":
            raise UserError(f"{where}: tokenizer model is {model.get('type')!r}, not BPE; only byte-level BPE "
                            f"tokenizers are supported (Qwen, SmolLM2, GPT-2, Llama 3 style)")
        if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise UserError(f"{where}: BPE with byte_fallback or subword prefixes/suffixes is not byte-level BPE "
                            f"(a sentencepiece-style tokenizer); not supported")
        if model.get("dropout"):
            raise UserError(f"{where}: BPE dropout is set ({model['dropout']}); tokenization would be random")
        decoder = json.dumps(data.get("decoder"))
        if '"ByteLevel"' not in decoder:
            raise UserError(f"{where}: the decoder is not ByteLevel, so this is not a byte-level BPE tokenizer")
        splits = _splits_from_pre_tokenizer(data.get("pre_tokenizer"), where)
        normalizer = _normalizer_from_json(data.get("normalizer"), where)
        added = {int(t["id"]): t["content"] for t in data.get("added_tokens") or []}
        tokens = {}
        for s, i in model.get("vocab", {}).items():
            if int(i) not in added:
                tokens[int(i)] = _unicode_to_bytes(s, where)
        merges = [_merge_pair(m, where) for m in model.get("merges", [])]
        if not tokens:
            raise UserError(f"{where}: the BPE vocabulary is empty")
        return cls(tokens=tokens, merges=merges, added=added, splits=splits, normalizer=normalizer,
                   chat_template=chat_template, name=where, path=path, **kwargs)

    @classmethod
    def from_gguf_fields(cls, fields: dict, *, path=None, **kwargs):
        """From GGUF tokenizer metadata: fields maps keys (tokenizer.ggml.tokens, .token_type,
        .merges, .pre, .model, ids, tokenizer.chat_template) to plain Python values."""
        where = path or "GGUF file"
        model = fields.get("tokenizer.ggml.model")
        if model is None:
            raise UserError(f"{where} holds no tokenizer (no tokenizer.ggml.model): use a GGUF with its tokenizer "
                            "embedded, as llama.cpp's convert_hf_to_gguf.py writes it")
        if model != "gpt2":
            raise UserError(f"{where}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') tokenizers "
                            f"are supported (a 'llama' one is sentencepiece)")
        pre = fields.get("tokenizer.ggml.pre", "gpt2")
        if pre not in GGUF_PRE_SPLITS:
            raise UserError(f"{where}: GGUF pre-tokenizer {pre!r} is not supported (known: "
                            f"{', '.join(sorted(GGUF_PRE_SPLITS))})")
        names = fields.get("tokenizer.ggml.tokens") or []
        types = fields.get("tokenizer.ggml.token_type") or [_GGUF_NORMAL] * len(names)
        if len(types) != len(names):
            raise UserError(f"{where}: {len(names)} tokens but {len(types)} token types; the file is damaged")
        tokens, added = {}, {}
        for i, (s, t) in enumerate(zip(names, types)):
            if int(t) == _GGUF_NORMAL:
                tokens[i] = _unicode_to_bytes(s, where)
            else:
                added[i] = s
        if not names:
            raise UserError(f"{where} holds no tokenizer.ggml.tokens: the tokenizer is incomplete; use a GGUF with "
                            "its tokenizer embedded")
        if not fields.get("tokenizer.ggml.merges"):  # without them every text would encode byte by byte
            raise UserError(f"{where} has no tokenizer.ggml.merges: a byte-level BPE cannot produce the model's "
                            "tokens without its merges; use a GGUF converted with them (convert_hf_to_gguf.py)")
        merges = [_merge_pair(m, where) for m in fields["tokenizer.ggml.merges"]]
        special_ids = {k: fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "pad", "unknown")}
        special_ids = {("unk" if k == "unknown" else k): v for k, v in special_ids.items() if v is not None}
        return cls(tokens=tokens, merges=merges, added=added, splits=GGUF_PRE_SPLITS[pre],
                   chat_template=fields.get("tokenizer.chat_template"), special_ids=special_ids,
                   name=where, path=path, **kwargs)

    @classmethod
    def from_file(cls, path, **kwargs):
        """From a .gguf file, a tokenizer.json, or a model folder holding tokenizer.json (with
        tokenizer_config.json / chat_template.jinja for the chat template, and config.json /
        generation_config.json for the bos/eos ids)."""
        if str(path).endswith(".gguf"):
            return cls.from_gguf_fields(read_gguf_fields(path), path=path, **kwargs)
        if os.path.isdir(path):
            return cls.from_hf_folder(path, **kwargs)
        return cls.from_tokenizer_json(path, **kwargs)

    @classmethod
    def from_hf_folder(cls, folder, **kwargs):
        tj = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(tj):
            extra = " (it has tokenizer.model: a sentencepiece tokenizer, not supported)" if os.path.isfile(
                os.path.join(folder, "tokenizer.model")) else ""
            raise UserError(f"model folder {folder} has no tokenizer.json{extra}; copy the model's tokenizer.json "
                            f"into it (only byte-level BPE tokenizers are supported)")

        def read_json(name):
            p = os.path.join(folder, name)
            if not os.path.isfile(p):
                return {}
            try:
                with open(p, encoding="utf-8") as f:
                    data = json.load(f)
            except ValueError as e:
                raise UserError(f"{p} is not valid JSON ({first_line(e, 100)})") from None
            if not isinstance(data, dict):
                raise UserError(f"{p} holds a JSON {type(data).__name__}, not an object; the file is damaged")
            return data

        tc = read_json("tokenizer_config.json")
        template = tc.get("chat_template")
        jinja = os.path.join(folder, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        special_ids = {}
        for src in (read_json("config.json"), read_json("generation_config.json")):
            for k in ("bos", "eos", "pad"):
                v = src.get(f"{k}_token_id")
                if isinstance(v, list):
                    v = v[0] if v else None
                if v is not None:
                    special_ids[k] = v
        kwargs.setdefault("special_ids", special_ids)
        return cls.from_tokenizer_json(tj, chat_template=template, path=folder, **kwargs)


def open_gguf(path):
    """A gguf.GGUFReader on `path`, or one line saying why the file cannot be read."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # a truncated or foreign file fails in numpy/struct code
        if isinstance(e, OSError):  # no permission, a folder
            raise UserError(f"cannot read GGUF file {path}: {e.strerror or type(e).__name__}") from None
        with open(path, "rb") as f:
            head = f.read(8)
        if head[:4] != b"GGUF":
            raise UserError(f"cannot read GGUF file {path}: it does not start with the GGUF magic, so it is not a "
                            "GGUF file") from None
        if int.from_bytes(head[4:8], "little") in (2, 3):  # a version the reader knows: the file ends early
            raise UserError(f"cannot read GGUF file {path}: it is truncated or damaged ({os.path.getsize(path):,} "
                            "bytes); copy or download it again") from None
        raise UserError(f"cannot read GGUF file {path}: {type(e).__name__}: {first_line(e, 120)}") from None


def read_gguf_fields(path, prefixes=("tokenizer.", "general.")) -> dict:
    """The metadata of a GGUF file whose key starts with one of `prefixes`, as plain Python values."""
    return gguf_fields(open_gguf(path), prefixes)


def gguf_fields(reader, prefixes=None) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if prefixes is None or key.startswith(tuple(prefixes)):
            out[key] = field.contents()
    return out


def _splits_from_pre_tokenizer(pre, where):
    """tokenizer.json pre_tokenizer -> list of split regexes (Split/Digits stages, then ByteLevel)."""
    if pre is None:
        raise UserError(f"{where}: no pre_tokenizer; a byte-level BPE tokenizer needs a ByteLevel pre-tokenizer")
    stages = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    splits, byte_level = [], False
    for st in stages:
        kind = st.get("type")
        if byte_level:
            raise UserError(f"{where}: pre-tokenizer {kind} after ByteLevel is not supported")
        if kind == "Split":
            pattern = st.get("pattern") or {}
            if st.get("behavior") != "Isolated" or st.get("invert"):
                raise UserError(f"{where}: Split pre-tokenizer with behavior {st.get('behavior')!r}"
                                f"{' inverted' if st.get('invert') else ''} is not supported (only Isolated)")
            if "Regex" in pattern:
                splits.append(pattern["Regex"])
            elif "String" in pattern:
                splits.append(regex.escape(pattern["String"]))
            else:
                raise UserError(f"{where}: Split pre-tokenizer without a pattern")
        elif kind == "Digits":
            splits.append(DIGITS_SPLIT if st.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel":
            if st.get("add_prefix_space", True):
                raise UserError(f"{where}: ByteLevel add_prefix_space=true is not supported")
            if st.get("use_regex", True):
                splits.append(GPT2_SPLIT)
            byte_level = True
        else:
            raise UserError(f"{where}: pre-tokenizer {kind!r} is not supported; this is not a byte-level BPE "
                            f"tokenizer of a supported kind (Split / Digits / ByteLevel only)")
    if not byte_level:
        raise UserError(f"{where}: the pre_tokenizer has no ByteLevel stage, so this is not a byte-level BPE tokenizer")
    return splits or [WHOLE_TEXT]


def _normalizer_from_json(norm, where):
    if norm is None:
        return None
    items = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    kinds = [n.get("type") for n in items]
    if kinds == []:
        return None
    if kinds == ["NFC"]:
        return "NFC"
    raise UserError(f"{where}: normalizer {kinds} is not supported (only none or NFC)")


def load_bpe(meta, base_dir):
    """A pretrained model's BPE from the file it came from: `file` in base_dir, else `path`."""
    candidates = [os.path.join(base_dir, meta["file"])] if base_dir and meta.get("file") else []
    candidates += [meta["path"]] if meta.get("path") else []
    path = next((p for p in candidates if os.path.exists(p)), None)
    if path is None:
        raise UserError(f"the model's tokenizer file is gone (looked for {', '.join(candidates) or 'nothing'}); "
                        f"put the model's tokenizer.json or .gguf back there")
    tok = BPETokenizer.from_file(path, vocab_size=meta.get("vocab_size"), mask_id=meta.get("mask_id"))
    if meta.get("sha256") and meta["sha256"] != tok.content_sha256():
        raise UserError(f"tokenizer {path} is not the one this meta was made with (its content hash differs); "
                        f"point to the model it was made with")
    return tok


def tokenizer_json(tokens: dict, merges: list, added: dict, splits: list, normalizer=None) -> dict:
    """A Hugging Face tokenizer.json (as a dict) for byte-level BPE: tokens {id: bytes}, merges
    [(bytes, bytes)], added tokens {id: str}; Split stages then ByteLevel, as tokenizers' own files."""
    stages = [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False} for p in splits]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    to_str = lambda b: "".join(BYTE_TO_CHAR[x] for x in b)  # noqa: E731
    vocab = {to_str(b): i for i, b in sorted(tokens.items())}
    for i, c in sorted(added.items()):  # as tokenizers' own files do (GPT-2, SmolLM2)
        vocab.setdefault(c, i)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, c in sorted(added.items())],
        "normalizer": {"type": "NFC"} if normalizer == "NFC" else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": stages + [byte_level]},
        "post_processor": None,
        "decoder": dict(byte_level),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [[to_str(a), to_str(b)] for a, b in merges]},
    }


def byte_tokenizer_json(eot_id: int, mask_id: int) -> dict:
    """tokenizer.ByteTokenizer as a tokenizer.json: 256 byte tokens (id = byte value), no merges, end
    of text and MASK as added tokens; what an exported byte-level model ships so it can be read back."""
    return tokenizer_json({b: bytes([b]) for b in range(256)}, [], {eot_id: EOT_STRING, mask_id: MASK_STRING}, [])


def load_any_tokenizer(meta, base_dir=None, model_bytes=None):
    """tokenizer.load_tokenizer, plus the "bpe" kind of a pretrained model's tokenizer."""
    meta = meta.get("tokenizer", meta)
    if meta.get("kind") != "bpe":
        return load_tokenizer(meta, base_dir, model_bytes)
    tok = load_bpe(meta, base_dir)
    for key in ("vocab_size", "eot_id", "mask_id"):
        if key in meta and meta[key] != getattr(tok, key):
            raise UserError(f"rebuilt bpe tokenizer has {key} {getattr(tok, key)} but meta says {meta[key]}")
    return tok

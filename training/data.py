"""
The data head (and base) training reads: random training windows and fixed validation windows of
a prepared corpus (data/prepare.py), or rows the base wrote itself (data/self_distill.py) with the
mask of the tokens that are its own answer.
"""

import json
import os

import torch

from errors import UserError
from tokenizer import load_tokens


def read_data_meta(data_dir: str) -> dict:
    """meta.json of a folder written by data/prepare.py or data/self_distill.py (the one place it is read)."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"no {path}: make the folder first (`python data/prepare.py` for a corpus, `python "
                        f"data/self_distill.py` for a model's own answers) or pass the right --data-dir")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:  # bad JSON (a ValueError), unreadable file
        raise UserError(f"{path} is not readable JSON ({type(e).__name__}); run `python data/prepare.py` again") from None
    missing = [k for k in ("dtype", "tokenizer", "vocab_size", "eot_id") if k not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: not written by data/prepare.py; run it again")
    return meta


class TokenData:
    """Random training windows and fixed validation windows from the token files of prepare.py."""

    masked = False  # no response masks: every token is a training target

    def __init__(self, data_dir: str, meta: dict | None = None):
        self.data_dir, self.meta = data_dir, meta or read_data_meta(data_dir)
        try:
            self.train = load_tokens(os.path.join(data_dir, "train.bin"), self.meta["dtype"])
            self.val = load_tokens(os.path.join(data_dir, "val.bin"), self.meta["dtype"])
        except (ValueError, FileNotFoundError) as e:  # tokenizer.py: a missing or truncated token file
            raise UserError(str(e)) from None

    def check_length(self, length: int, what: str):
        """Both splits must hold more than one window of `length` tokens: found now, not at the first
        evaluation after minutes of training."""
        for split in ("train", "val"):
            n = getattr(self, split).numel()
            if n <= length:
                raise UserError(f"{self.data_dir}/{split}.bin has {n} tokens, too few for {what} of {length}: prepare "
                                "more text (data/prepare.py; for val, a larger --val-fraction) or lower --seq-len")

    def train_windows(self, batch_size: int, length: int, generator: torch.Generator):
        """(tokens (B, length), response mask (B, length) or None: every token counts)."""
        return windows(self.train, batch_size, length, generator), None

    def val_windows(self, batch_size: int, length: int, generator: torch.Generator):
        return windows(self.val, batch_size, length, generator), None


class SelfDistilledData(TokenData):
    """Rows the base wrote itself (data/self_distill.py), drawn at random, with the mask of the
    tokens that are the base's own answer (chat data; corpus-prompted rows count whole). Validation
    on held-out rows (chat data: answers to held-out prompts) or on the corpus the prompts came from."""

    def __init__(self, data_dir: str, meta: dict):
        self.data_dir, self.meta = data_dir, meta
        self.rows, self.response = self._read_rows(data_dir, "rows_")
        self.masked = not bool(self.response.all())
        if meta.get("val") == "rows":
            self.val_rows, self.val_response = self._read_rows(data_dir, "val_rows_")
        else:
            self.val = TokenData(meta["source_data_dir"]).val

    @staticmethod
    def _read_rows(data_dir, prefix):
        """Shards are (N, L) token tensors, or {"tokens": (N, L), "response": (N, L) bool}."""
        shards = sorted(f for f in os.listdir(data_dir) if f.startswith(prefix) and f.endswith(".pt"))
        if not shards:
            raise UserError(f"{data_dir} holds no {prefix}*.pt shards yet: run data/self_distill.py to the end")
        tokens, response = [], []
        try:
            for f in shards:
                shard = torch.load(os.path.join(data_dir, f), weights_only=True)
                shard = shard if isinstance(shard, dict) else {"tokens": shard, "response": torch.ones_like(shard, dtype=torch.bool)}
                tokens.append(shard["tokens"].long())
                response.append(shard["response"].bool())
        except Exception as e:  # a damaged shard: say which folder and how to regenerate it
            raise UserError(f"a shard in {data_dir} is not readable ({type(e).__name__}); delete it and run "
                            "data/self_distill.py again") from None
        return torch.cat(tokens), torch.cat(response)

    def check_length(self, length: int, what: str):
        if self.rows.size(1) < length:
            raise UserError(f"{self.data_dir} holds rows of {self.rows.size(1)} tokens, too short for {what} of "
                            f"{length}: lower --seq-len or generate longer rows (--row-len)")
        if hasattr(self, "val") and self.val.numel() <= length:  # the corpus's held-out split
            raise UserError(f"{self.meta['source_data_dir']}/val.bin has {self.val.numel()} tokens, too few for "
                            f"{what} of {length}: lower --seq-len")

    def train_windows(self, batch_size, length, generator):
        pick = torch.randint(0, self.rows.size(0), (batch_size,), generator=generator)
        return self.rows[pick, :length], self.response[pick, :length]

    def val_windows(self, batch_size, length, generator):
        if hasattr(self, "val"):
            return super().val_windows(batch_size, length, generator)
        pick = torch.randint(0, self.val_rows.size(0), (batch_size,), generator=generator)
        return self.val_rows[pick, :length], self.val_response[pick, :length]


def load_data(data_dir: str) -> TokenData:
    """The training data in `data_dir`: a prepared corpus, or rows the base wrote itself."""
    meta = read_data_meta(data_dir)
    return SelfDistilledData(data_dir, meta) if meta.get("kind") == "self-distilled" else TokenData(data_dir, meta)


def windows(tokens, batch_size: int, length: int, generator: torch.Generator):
    """(batch_size, length) int64 windows of a token stream, starting at random offsets."""
    starts = torch.randint(0, tokens.numel() - length, (batch_size,), generator=generator).tolist()
    return torch.stack([tokens[s : s + length].long() for s in starts])

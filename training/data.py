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
from training.anchors import response_anchors

CHECK_CHUNK = 1 << 24  # tokens (or mask entries) checked at a time when data is opened: 128 MiB as int64


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
    if type(meta["vocab_size"]) is not int or meta["vocab_size"] < 1:
        raise UserError(f"{path} has vocab_size {meta['vocab_size']!r}, not a positive integer; run data/prepare.py again")
    return meta


def check_token_ids(tokens: torch.Tensor, vocab_size: int, path: str, fix: str):
    """Every id in tokens ((N,) or (rows, row_len)) must lie in [0, vocab_size): checked over the whole
    data once, when it is opened. An id past the vocabulary indexes past the embedding, and one
    that only appears every 1000th token or in one row would otherwise train on garbage unnoticed."""
    flat = tokens.reshape(-1)
    for start in range(0, flat.numel(), CHECK_CHUNK):
        chunk = flat[start : start + CHECK_CHUNK].long()  # uint16/uint32 tensors support no comparisons
        bad = (chunk < 0) | (chunk >= vocab_size)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            at = f"token {start + i}" if tokens.dim() == 1 else "row {}, column {}".format(*divmod(start + i, tokens.size(1)))
            raise UserError(f"{path} holds token id {int(chunk[i])} ({at}), outside the vocabulary [0, {vocab_size}) "
                            f"of its meta.json; {fix}")


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
        for split in ("train", "val"):
            check_token_ids(getattr(self, split), self.meta["vocab_size"], os.path.join(data_dir, f"{split}.bin"),
                            "prepare the data again (data/prepare.py) with the tokenizer its meta.json names")

    def check_length(self, length: int, what: str):
        """Both splits must hold more than one window of `length` tokens: found now, not at the first
        evaluation after minutes of training."""
        for split in ("train", "val"):
            n = getattr(self, split).numel()
            if n <= length:
                raise UserError(f"{self.data_dir}/{split}.bin has {n} tokens, too few for {what} of {length}: prepare "
                                "more text (data/prepare.py; for val, a larger --val-fraction) or lower --seq-len")

    def check_blocks(self, draft_lens: list, length: int, placement: str):
        """Every position of a corpus can anchor a block (train.check_draft_fits checks the length)."""

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
        self.rows, self.response = self._read_rows(data_dir, "rows_", meta["vocab_size"])
        self.masked = not bool(self.response.all())
        if meta.get("val") == "rows":
            self.val_rows, self.val_response = self._read_rows(data_dir, "val_rows_", meta["vocab_size"])
        else:
            self.val = TokenData(meta["source_data_dir"]).val

    @staticmethod
    def _read_rows(data_dir, prefix, vocab_size):
        """Shards are (N, L) token tensors, or {"tokens": (N, L), "response": (N, L) bool}."""
        shards = sorted(f for f in os.listdir(data_dir) if f.startswith(prefix) and f.endswith(".pt"))
        if not shards:
            raise UserError(f"{data_dir} holds no {prefix}*.pt shards yet: run data/self_distill.py to the end")
        tokens, response = [], []
        for f in shards:
            path = os.path.join(data_dir, f)
            try:
                shard = torch.load(path, weights_only=True)
            except Exception as e:  # a damaged shard: say which one and how to regenerate it
                raise UserError(f"{path} is not readable ({type(e).__name__}); delete it and run "
                                "data/self_distill.py again") from None
            rows = shard.get("tokens") if isinstance(shard, dict) else shard
            mask = shard.get("response") if isinstance(shard, dict) else None
            if mask is None and isinstance(rows, torch.Tensor):
                mask = torch.ones_like(rows, dtype=torch.bool)
            if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.dtype.is_floating_point \
                    or rows.dtype.is_complex or rows.dtype == torch.bool:
                what = f"a {rows.dim()}-D {rows.dtype} tensor" if isinstance(rows, torch.Tensor) else \
                    "no tensor" if rows is None else f"a {type(rows).__name__}"
                raise UserError(f"{path} holds {what} for its tokens, not integer ids (rows, row_len); delete it and "
                                "run data/self_distill.py again")
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != rows.shape:
                raise UserError(f"{path}: its response mask is not a bool tensor shaped like its tokens "
                                f"{tuple(rows.shape)}; delete it and run data/self_distill.py again")
            if tokens and rows.size(1) != tokens[0].size(1):
                raise UserError(f"{path} holds rows of {rows.size(1)} tokens, {shards[0]} rows of "
                                f"{tokens[0].size(1)}; pack the shards again (data/self_distill.py)")
            check_token_ids(rows, vocab_size, path, "delete it and run data/self_distill.py again")
            tokens.append(rows.long())
            response.append(mask)
        return torch.cat(tokens), torch.cat(response)

    def check_length(self, length: int, what: str):
        if self.rows.size(1) < length:
            raise UserError(f"{self.data_dir} holds rows of {self.rows.size(1)} tokens, too short for {what} of "
                            f"{length}: lower --seq-len or generate longer rows (--row-len)")
        if hasattr(self, "val") and self.val.numel() <= length:  # the corpus's held-out split
            raise UserError(f"{self.meta['source_data_dir']}/val.bin has {self.val.numel()} tokens, too few for "
                            f"{what} of {length}: lower --seq-len")

    def check_blocks(self, draft_lens: list, length: int, placement: str):
        """A head trains a block of K only where its K-1 targets are all the base's answer: some row
        (of its first `length` tokens) must hold one for every K, with the training placement, and
        some held-out row with the aligned placement evaluation uses. Found now, not as a failure
        at the first step; train.py draws windows again when a batch happens to hold no block."""
        splits = [("rows_*.pt", self.response, placement)]
        if not hasattr(self, "val"):
            splits.append(("val_rows_*.pt", self.val_response, "aligned"))
        for files, response, where in splits:
            response = response[:, :length]
            for K in draft_lens:
                if not any(response_anchors(part, K)[:, :: K if where == "aligned" else 1].any()
                           for part in response.split(max(1, CHECK_CHUNK // length))):
                    after = f" starting after a multiple of {K} ({where} anchors)" if where == "aligned" else ""
                    raise UserError(f"no anchor fits in {self.data_dir}/{files}: a block of {K} needs {K - 1} answer "
                                    f"tokens in a row{after}, the longest run of answer tokens there is "
                                    f"{longest_run(response)}; pass a smaller --draft-lens or generate longer answers "
                                    "(data/self_distill.py --max-new-tokens, --row-len)")

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


def longest_run(response: torch.Tensor) -> int:
    """The longest run of True in any row of a (N, T) bool mask (the answer tokens at positions 1..T-1:
    position 0 is never a block's target)."""
    best = 0
    for part in response[:, 1:].split(max(1, CHECK_CHUNK // max(1, response.size(1)))):
        col = torch.arange(part.size(1)).expand_as(part)
        last_gap = torch.where(part, -1, col).cummax(1).values  # (n, T-1): the latest False at or before each column
        best = max(best, int((col - last_gap).max()) if part.numel() else 0)
    return best


def windows(tokens, batch_size: int, length: int, generator: torch.Generator):
    """(batch_size, length) int64 windows of a token stream, starting at random offsets."""
    starts = torch.randint(0, tokens.numel() - length, (batch_size,), generator=generator).tolist()
    return torch.stack([tokens[s : s + length].long() for s in starts])

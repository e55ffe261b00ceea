"""Prepare a corpus: read documents, split them into train/val, tokenize, write token files.

Writes into --out-dir: train.bin and val.bin (raw little-endian uint16 token ids, uint32 when the
vocabulary does not fit; every document is followed by the end-of-text id), meta.json (tokenizer
meta, dtype, token counts, the files in each split, a sha256 of the corpus) and, for
sentencepiece, tokenizer.model (trained on the training split only). Running the same command
twice gives byte-identical files.

Corpora:
  default         the Python standard library's own source, about 12 MB: every *.py under
                  sysconfig's stdlib folder, without site-packages/dist-packages and without
                  the stdlib's test suites (folders named test, tests, idle_test: about 19 MB
                  of deliberately odd code, add it with --include-tests). It is on every
                  machine that runs this script, needs no download, and is real code.
                  Files that are not valid UTF-8 are skipped.
  --input PATH..  your own files or folders (folders are walked for --glob; hidden folders and
                  __pycache__ are skipped); each file is one document unless --doc-separator.
  --source tinystories
                  downloads TinyStoriesV2-GPT4-valid.txt (about 20 MB of short stories) into
                  --out-dir once and splits it into stories at its <|endoftext|> lines.

Train/val split: by document, deterministic. Documents are ranked by the sha256 of their name
and the first ceil(val_fraction * n) go to val (at least one, and never all of them), so the
split does not depend on the order the files were found in, nor on the tokenizer.

Examples (from the repository root):
  python data/prepare.py                                  # stdlib, byte tokenizer -> data/stdlib
  python data/prepare.py --tokenizer sentencepiece --vocab-size 4096 --out-dir data/stdlib_sp
  python data/prepare.py --tokenizer tiktoken --encoding gpt2 --out-dir data/stdlib_gpt2
  python data/prepare.py --input ~/src/myproject --glob '*.py' --out-dir data/myproject
  python data/prepare.py --source tinystories --tokenizer sentencepiece
  python data/prepare.py --tokenizer-from path/to/Qwen3-0.6B --out-dir data/stdlib_qwen3   # a real model's own
  python data/prepare.py --tokenizer-from SmolLM2-135M-Instruct.Q4_1.gguf --out-dir data/stdlib_smol
"""
import hashlib
import http.client
import json
import math
import os
import platform
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # so `python data/prepare.py` can import tokenizer.py

import tokenizer as tk  # noqa: E402
from cli import ArgumentParser, run_cli  # noqa: E402
from data.corpus import find_files, read_utf8, stdlib_root  # noqa: E402
from errors import UserError  # noqa: E402  (one line `error: ...`, exit code 2)
from pretrained import is_pretrained_path, load_model_tokenizer  # noqa: E402
from pretrained.bpe import BPETokenizer  # noqa: E402

TINYSTORIES_URL = (
    "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt"
)
# A split with fewer tokens than this cannot give train.py one window of the gpu preset (1024 + 1
# tokens; the cpu preset needs 513): warned about, since a small --seq-len can still use it.
MIN_SPLIT_TOKENS = 1025


def build_parser():
    p = ArgumentParser(__doc__)
    src = p.add_argument_group("corpus")
    src.add_argument("--source", choices=["stdlib", "tinystories"], default=None,
                     help="built-in corpus: the Python stdlib's source (default when no --input) "
                          "or TinyStories (downloaded)")
    src.add_argument("--input", nargs="+", metavar="PATH", default=None,
                     help="your own text files and/or folders (walked recursively for --glob; "
                          "files named directly are always read) instead of a built-in corpus")
    src.add_argument("--glob", nargs="+", metavar="PATTERN", default=["*.py", "*.txt", "*.md"],
                     help="file name patterns to take from --input folders (default: *.py *.txt *.md)")
    src.add_argument("--doc-separator", default=None, metavar="STR",
                     help="split each file into documents at this string (e.g. '<|endoftext|>'); "
                          "by default every file is one document")
    src.add_argument("--include-tests", action="store_true",
                     help="stdlib corpus: also take the stdlib test suites (about 30 MB instead of 12)")
    src.add_argument("--url", default=None,
                     help=f"TinyStories download address (default: {TINYSTORIES_URL})")
    p.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                   help="fraction of documents that go to val (default: %(default)s)")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", choices=["byte", "sentencepiece", "tiktoken"], default="byte",
                     help="byte: UTF-8 bytes (vocab 258); sentencepiece: BPE trained here on the "
                          "train split; tiktoken: a named encoding (needs its file; default: %(default)s)")
    tok.add_argument("--vocab-size", type=int, default=4096, metavar="N",
                     help="sentencepiece vocabulary size, special ids included (default: %(default)s)")
    tok.add_argument("--tokenizer-from", default=None, metavar="MODEL",
                     help="use a pretrained model's own tokenizer: a Hugging Face folder (tokenizer.json), "
                          "a tokenizer.json or a .gguf file (overrides --tokenizer)")
    tok.add_argument("--encoding", default="gpt2", metavar="NAME",
                     help="tiktoken encoding name (default: %(default)s)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="output folder (default: data/stdlib, data/tinystories or data/custom "
                        "in the repository)")
    return p


# -----------------------------------------------------------------------------
# finding and reading documents


def read_files(pairs):
    """pairs of (name, path) -> (list of (name, text) files, list of names skipped as not UTF-8)."""
    files, skipped = [], []
    for name, path in pairs:
        text = read_utf8(path)
        if text is None:
            skipped.append(name)
        else:
            files.append((name, text))
    return files, skipped


def input_pairs(paths, patterns):
    """(name, path) for every --input file; names are relative (folder name / path inside it)."""
    pairs = []
    for p in paths:
        if not os.path.exists(p):
            raise UserError(f"input path {p} does not exist")
        base = os.path.basename(os.path.normpath(os.path.abspath(p)))
        if os.path.isdir(p):
            pairs += [(f"{base}/{rel}", os.path.join(p, rel)) for rel in find_files(p, patterns)]
        else:
            pairs.append((base, p))
    seen = set()
    for name, _ in pairs:
        if name in seen:
            raise UserError(f"two inputs give the same document name {name}; pass their common "
                            f"parent folder instead")
        seen.add(name)
    return pairs


def download(url, out_dir):
    """Download url into out_dir once (later runs reuse the file); return the local path."""
    path = os.path.join(out_dir, os.path.basename(url.split("?")[0]) or "download.txt")
    if os.path.exists(path):
        print(f"using cached download {path}")
        return path
    print(f"downloading {url} ...")
    tmp = path + ".tmp"
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = getattr(e, "reason", e)
        raise UserError(f"could not download {url} ({reason}); without network, download it "
                        f"elsewhere and pass --input FILE --doc-separator '<|endoftext|>' instead")
    os.replace(tmp, path)  # only a complete download gets the final name
    return path


def to_documents(files, separator):
    """Each file is one document, or several when cut at separator (named name#k, stripped)."""
    docs = []
    for name, text in files:
        if separator is None:
            if text:
                docs.append((name, name, text))
            continue
        parts = [part.strip() for part in text.split(separator)]
        docs += [(f"{name}#{k}", name, part) for k, part in enumerate(parts) if part]
    return docs  # (document name, file name, text)


def split_documents(docs, val_fraction):
    """Deterministic by-document split: the lowest sha256(name) ranks go to val."""
    if len(docs) < 2:
        raise UserError(f"need at least 2 documents to split into train and val, found {len(docs)}")
    n_val = min(max(math.ceil(val_fraction * len(docs)), 1), len(docs) - 1)
    ranked = sorted(range(len(docs)), key=lambda i: hashlib.sha256(docs[i][0].encode()).digest())
    val = set(ranked[:n_val])
    return ({"train": [d for i, d in enumerate(docs) if i not in val],
             "val": [d for i, d in enumerate(docs) if i in val]})


# -----------------------------------------------------------------------------
# main


def make_tokenizer(args, out_dir, train_docs):
    if args.tokenizer_from:  # its own errors are UserErrors already
        path = args.tokenizer_from  # a model (its vocabulary size fixes the MASK id) or a bare tokenizer.json
        tok = load_model_tokenizer(path) if is_pretrained_path(path) else BPETokenizer.from_file(path)
        print(f"tokenizer: {args.tokenizer_from} (byte-level BPE, vocab {tok.vocab_size}, MASK id {tok.mask_id})")
        return tok
    # tokenizer.py raises UserError for what a user can fix (a too-small vocabulary, no tiktoken cache)
    if args.tokenizer == "byte":
        return tk.ByteTokenizer()
    if args.tokenizer == "sentencepiece":
        t0 = time.time()
        print(f"training sentencepiece BPE (vocab {args.vocab_size}) on the train split ...")
        tok = tk.train_sentencepiece((text for _, _, text in train_docs),
                                     os.path.join(out_dir, "tokenizer"), args.vocab_size)
        print(f"  vocab {tok.vocab_size} in {time.time() - t0:.1f}s -> {tok.model_file}")
        return tok
    return tk.get_tiktoken(args.encoding)


def make_out_dir(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # a parent that is a file, no permission, read-only disk
        raise UserError(f"cannot create --out-dir {out_dir} ({e.strerror or type(e).__name__}); "
                        f"pass a folder you can write to") from None


def run(args):
    t_start = time.time()
    if args.source and args.input:
        raise UserError("pass either --source or --input, not both")
    if not 0 < args.val_fraction < 1:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    if args.url and args.source != "tinystories":
        raise UserError("--url only applies to --source tinystories")
    if args.tokenizer == "sentencepiece" and args.vocab_size < tk.SP_MIN_VOCAB:
        raise UserError(f"--vocab-size {args.vocab_size} is too small for sentencepiece: 256 byte "
                        f"pieces and 4 special pieces take 260 ids, use at least {tk.SP_MIN_VOCAB}")
    if args.doc_separator is not None and not args.doc_separator:
        raise UserError("--doc-separator is empty: pass the string that separates documents "
                        "(e.g. '<|endoftext|>'), or leave the flag out to make every file one document")
    source = args.source or ("custom" if args.input else "stdlib")
    out_dir = args.out_dir or os.path.join(ROOT, "data", source)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out-dir {out_dir} is a file; pass a folder (train.bin, val.bin and meta.json go inside)")

    # byte and tiktoken need no corpus: build them first so a missing tiktoken file fails fast
    tok = make_tokenizer(args, out_dir, None) if args.tokenizer != "sentencepiece" or args.tokenizer_from else None

    # 1. documents
    separator = args.doc_separator
    if source == "stdlib":
        root = stdlib_root()
        rels = find_files(root, ["*.py"], include_tests=args.include_tests)
        what = (f"Python {platform.python_version()} standard library, *.py, "
                f"{'with' if args.include_tests else 'without'} test suites")
        print(f"reading {len(rels)} files under {root} ({what})")
        files, skipped = read_files((rel, os.path.join(root, rel)) for rel in rels)
    elif source == "tinystories":
        make_out_dir(out_dir)  # the download is cached there
        path = download(args.url or TINYSTORIES_URL, out_dir)
        what = f"TinyStories ({os.path.basename(path)}), one document per story"
        files, skipped = read_files([(os.path.basename(path), path)])
        separator = separator or tk.EOT_STRING
    else:
        names = [os.path.basename(os.path.normpath(os.path.abspath(x))) for x in args.input]
        what = f"--input {' '.join(names)} (--glob {' '.join(args.glob)})"
        pairs = input_pairs(args.input, args.glob)
        print(f"reading {len(pairs)} input files")
        files, skipped = read_files(pairs)
    if skipped:
        print(f"skipped {len(skipped)} files that are not valid UTF-8: {', '.join(skipped[:5])}"
              f"{' ...' if len(skipped) > 5 else ''}")
    docs = to_documents(files, separator)
    n_empty = sum(1 for _, text in files if not text)
    if n_empty:
        print(f"skipped {n_empty} empty files")
    if not docs:
        raise UserError(f"empty corpus: no non-empty UTF-8 documents in {what}")
    corpus_hash = hashlib.sha256()
    for name, _, text in docs:  # tokenizer-independent fingerprint of exactly what was read
        corpus_hash.update(name.encode() + b"\0" + text.encode() + b"\0")
    splits = split_documents(docs, args.val_fraction)
    print(f"{len(docs)} documents: {len(splits['train'])} train, {len(splits['val'])} val")

    # 2. sentencepiece learns its vocabulary from the training split only
    make_out_dir(out_dir)  # created only now that the inputs proved usable
    tok = tok or make_tokenizer(args, out_dir, splits["train"])
    dtype = tk.token_dtype(tok.vocab_size)

    # 3. token files
    stats = {}
    for split, split_docs in splits.items():
        t0 = time.time()
        n_tokens = n_bytes = 0
        with open(os.path.join(out_dir, f"{split}.bin.tmp"), "wb") as f:
            for _, _, text in split_docs:
                ids = tok.encode(text)
                ids.append(tok.eot_id)  # documents are separated (and ended) by end-of-text
                tk.write_tokens(f, ids, dtype)
                n_tokens += len(ids)
                n_bytes += len(text.encode())
        os.replace(os.path.join(out_dir, f"{split}.bin.tmp"), os.path.join(out_dir, f"{split}.bin"))
        files_in_split = sorted({file for _, file, _ in split_docs})
        stats[split] = {"file": f"{split}.bin", "documents": len(split_docs), "tokens": n_tokens,
                        "bytes": n_bytes, "files": files_in_split}
        print(f"{split}.bin: {n_tokens:,} tokens from {len(split_docs)} documents "
              f"({n_bytes:,} bytes) in {time.time() - t0:.1f}s")

    # 4. meta.json: plain, stable content only (no timestamps, no absolute paths)
    meta = {
        "source": source,
        "description": what,
        "tokenizer": tok.meta(),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "mask_id": tok.mask_id,
        "dtype": dtype,
        "val_fraction": args.val_fraction,
        "doc_separator": separator,
        "corpus_sha256": corpus_hash.hexdigest(),
        "skipped_files": skipped,
        "train": stats["train"],
        "val": stats["val"],
    }
    with open(os.path.join(out_dir, "meta.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))

    for split, st in stats.items():
        if st["tokens"] < MIN_SPLIT_TOKENS:
            print(f"warning: {split}.bin has only {st['tokens']:,} tokens, fewer than one training window "
                  f"of the cpu/gpu presets (513/1025 tokens): train.py will refuse it unless --seq-len is "
                  f"below {st['tokens'] - 1}; add text"
                  + (" or lower --val-fraction" if split == "train" else " or raise --val-fraction")
                  + " (the split is by document)", file=sys.stderr)

    n_tok = sum(s["tokens"] for s in stats.values())
    n_bytes = sum(s["bytes"] for s in stats.values())
    print(f"done in {time.time() - t_start:.1f}s: {len(files)} files, {len(docs)} documents, "
          f"{n_tok:,} tokens ({n_bytes / max(n_tok - len(docs), 1):.2f} bytes/token, "
          f"{tok.kind} vocab {tok.vocab_size}, {dtype}) -> {out_dir}")
    return 0


def main(argv=None):
    """Returns 0; a user mistake is a UserError (run_cli: one line, exit code 2)."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_cli(main))

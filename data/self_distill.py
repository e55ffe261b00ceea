"""
Self-distillation data: text written by the base model itself, the teacher data Orthrus' head is
trained on in the paper (arXiv 2605.12825, Sec. 3.3; docs/method.md, "Training"). Two modes.

CORPUS MODE (--base-ckpt CKPT --data-dir CORPUS): each row is a prompt of --prompt-len tokens
taken from the prepared corpus, continued by the base's own SAMPLES up to --row-len tokens (greedy
text of small models loops). Rows are written in shards as they are generated, so an interrupted
run resumes where it stopped (run the same command again).

    python data/self_distill.py --base-ckpt out/base/ckpt.pt --data-dir data/stdlib --out-dir data/self_stdlib
    python train.py --stage head --preset cpu --base-ckpt out/base/ckpt.pt --data-dir data/self_stdlib

The output folder holds rows_00000.pt, ... (int64 tensors (rows, row_len): every token counts as
response) and a meta.json that train.py reads like prepare.py's: the tokenizer, the base it came
from (sha256), the folder whose val split evaluates the head (source_data_dir: the corpus's
held-out text, not the base's own).

PROMPTS MODE (--prompts P --base MODEL): the base answers each prompt, the way the paper's data is
made (prompts answered by the base itself).
  P      a folder written by data/chat_prompts.py (train.jsonl + heldout.jsonl), or any prompt
         file it reads (JSONL with "prompt", or plain text), split by the same hash rule.
  MODEL  a .gguf file or a Hugging Face folder (pretrained.load_pretrained), or one of our .pt
         checkpoints (train.py / export.py).
  --chat auto (default): in the model's chat format (ChatML: pretrained.chat_prompt) when it has
         one, else the prompt text is continued as it is; --chat true on a model without a chat
         format is refused, --chat false continues plain text on any model.
Greedy (--temperature 0) or sampled (--temperature/--top-k/--top-p; small models loop when greedy),
up to --max-new-tokens per answer. Prompts are sorted by length and answered --batch-size at a time
by orthrus.generate_batch; each row stops at its own end id (any of the model's stop ids, its end
of turn, end of text). Each batch is one
shard, gen_00000.jsonl, ..., written atomically, one line per conversation
{"split", "index", "id", "prompt_ids", "response_ids", "stopped", "response"}, sampled from a
generator seeded by (--seed, shard): a rerun of the same command skips the shards that exist and
writes byte-identical files, wherever it stopped. meta.json records the settings from the start
(base path and sha256 of its weights, tokenizer sha256, prompt file sha256, sampling, batch size);
a rerun with other settings is refused. When every shard exists, the conversations are PACKED
(a rerun with another --row-len just packs again):

  conversation = prompt ids + response ids (ending with the end id the model generated), or, for
  an answer cut at --max-new-tokens, + the end-of-turn id (end of text without chat) that the
  model did not generate. Training conversations, in prompt-file order, are concatenated into one
  stream and cut into rows of --row-len tokens; the last row is filled up with end-of-text ids.
  Held-out conversations are packed the same way into their own rows.

PACKED FORMAT (the contract train.py reads):
  rows_00000.pt, rows_00001.pt, ...  {"tokens": LongTensor (N, row_len), "response": BoolTensor
                (N, row_len)}, at most --rows-per-file rows each. response[i, j] is True exactly
                where the base GENERATED tokens[i, j] (the end-of-turn/end id it generated
                included); prompt tokens, the end id added after a cut answer and the fill of the
                last row are False. Head anchors belong where a block's targets are response
                tokens. (Corpus mode writes plain LongTensors here: every token is response.)
  val_rows_00000.pt  the same dict, from the held-out prompts only (never training prompts).
  meta.json     "kind": "self-distilled", "row_len", "n_rows", "n_val_rows", "val": "rows",
                "tokenizer" (the tokenizer's meta dict), "vocab_size", "dtype" (token dtype name
                of the vocabulary), "eot_id", "end_of_turn_id", "stop_ids", "base", "base_format",
                "base_sha256" (checkpoint.state_sha256 of the base as loaded, in float32: what
                train.py compares), "tokenizer_sha256", "prompts",
                "prompts_sha256", "chat", "temperature", "top_k", "top_p", "seed",
                "max_new_tokens", "batch_size", "summary"; NO "source_data_dir" (there is no
                corpus). "n_rows" appears only once packing is done.

    python data/chat_prompts.py --max-prompts 3000
    python data/self_distill.py --prompts data/chat_prompts --base SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out-dir out/smol_self --max-new-tokens 256 --row-len 512 --threads 1
"""

import hashlib
import json
import os
import sys
import time

import torch

DATA = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DATA))  # the repository root

from checkpoint import build_base, load_checkpoint, open_model, save_checkpoint, state_sha256  # noqa: E402
from cli import (ArgumentParser, add_runtime_flags, add_sampling_flags, fmt_time, hold_folder, pick_device, run_cli,  # noqa: E402
                 set_threads, writing_into)
from data.prompts import read_prompt_file, read_prompt_folder, split_prompts  # noqa: E402
from errors import UserError  # noqa: E402
from orthrus import generate_batch  # noqa: E402
from sampling import Sampling  # noqa: E402
from tokenizer import load_tokens, token_dtype  # noqa: E402
from training.data import read_data_meta  # noqa: E402


def build_parser():
    p = ArgumentParser(__doc__)
    p.add_argument("--base-ckpt", default=None, help="corpus mode: the base model that writes the text "
                   "(train.py --stage base)")
    p.add_argument("--data-dir", default="data/stdlib", help="corpus mode: prepared corpus (data/prepare.py) the "
                   "prompts come from")
    p.add_argument("--out-dir", required=True, help="where the rows and meta.json go")
    p.add_argument("--tokens", type=int, default=1_000_000, help="corpus mode: tokens to generate in all "
                   "(rows x row length)")
    p.add_argument("--row-len", type=int, default=0, help="tokens per row (0 = the base's context in corpus mode, "
                   "512 in prompts mode)")
    p.add_argument("--prompt-len", type=int, default=32, help="corpus mode: corpus tokens that open each row")
    p.add_argument("--batch-size", type=int, default=None, help="rows generated together, one shard each "
                   "(default: 64 in corpus mode, 32 in prompts mode)")
    p.add_argument("--prompts", default=None, metavar="PATH", help="prompts mode: a data/chat_prompts.py folder or "
                   "a prompt file (JSONL with \"prompt\", or plain text)")
    p.add_argument("--base", default=None, metavar="MODEL", help="prompts mode: a .gguf file, a Hugging Face "
                   "folder or one of our .pt checkpoints")
    p.add_argument("--chat", choices=["auto", "true", "false"], default="auto", help="prompts mode: answer in the "
                   "model's chat format (auto: when it has one)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="prompts mode: longest answer (default 256)")
    p.add_argument("--max-prompts", type=int, default=0, help="prompts mode: answer only the first N training "
                   "prompts (0 = all; the held-out prompts are all answered)")
    p.add_argument("--rows-per-file", type=int, default=2048, help="prompts mode: packed rows per rows_*.pt file")
    p.add_argument("--pack-into", default=None, metavar="DIR", help="prompts mode: generate nothing; pack the shards "
                   "--out-dir holds so far into DIR (train a head on them while generation goes on)")
    add_sampling_flags(p, temperature=0.8, top_p=None, seed_help="seeds the prompt choice and the sampler")
    add_runtime_flags(p, threads=0)
    return p


def run_corpus(args):
    """Corpus mode: rows of corpus prompts continued by the base's samples (plain int64 tensors)."""
    if not args.base_ckpt:
        raise UserError("corpus mode needs --base-ckpt PATH (train.py --stage base); or pass --prompts FILE for "
                        "chat data")
    if args.top_p is not None or args.max_new_tokens is not None or args.chat != "auto" or args.max_prompts:
        raise UserError("--top-p, --max-new-tokens, --chat and --max-prompts belong to --prompts mode; corpus "
                        "mode uses --tokens, --row-len and --prompt-len")
    args.batch_size = 64 if args.batch_size is None else args.batch_size
    for name in ("tokens", "prompt_len", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.row_len < 0 or args.seed < 0 or args.top_k < 0:
        raise UserError("--row-len, --seed and --top-k must be >= 0")
    sampling = Sampling(args.temperature, args.top_k)
    if sampling.is_greedy:
        raise UserError("--temperature must be > 0: greedy continuations of a small model loop")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out-dir {args.out_dir!r} is a file; pass a folder")
    meta = read_data_meta(args.data_dir)
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.base_ckpt)
    if ckpt["tokenizer"] != meta["tokenizer"]:
        raise UserError(f"--data-dir {args.data_dir} was tokenized with {meta['tokenizer']['kind']} but the base "
                        f"uses {ckpt['tokenizer']['kind']}; prepare the data with the base's tokenizer")
    base = build_base(ckpt, device).requires_grad_(False).eval()
    row_len = args.row_len or base.config.context_len
    if not args.prompt_len < row_len <= base.config.context_len:
        raise UserError(f"need --prompt-len ({args.prompt_len}) < --row-len ({row_len}) <= the base's context "
                        f"({base.config.context_len})")
    train = load_tokens(os.path.join(args.data_dir, "train.bin"), meta["dtype"])
    if train.numel() <= args.prompt_len:
        raise UserError(f"{args.data_dir}/train.bin has {train.numel()} tokens, too few for prompts of {args.prompt_len}")

    out_meta = {**meta, "kind": "self-distilled", "source_data_dir": os.path.abspath(args.data_dir),
                "base_sha256": state_sha256(ckpt["model"]), "row_len": row_len, "prompt_len": args.prompt_len,
                "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed, "batch_size": args.batch_size}
    meta_path = os.path.join(args.out_dir, "meta.json")
    if os.path.exists(meta_path):  # resuming: it must be the same job
        with open(meta_path) as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in out_meta if k != "n_rows"} != out_meta:
            raise UserError(f"{args.out_dir} holds rows of another configuration or base; pick a new --out-dir")
    with writing_into(args.out_dir, "--out-dir"):
        with open(meta_path, "w") as f:
            json.dump(out_meta, f, indent=1)

    n_shards = -(-max(1, args.tokens // row_len) // args.batch_size)
    # every shard's prompts and sampler come from its own seed: a resumed run writes the same rows
    t0, made = time.time(), 0
    for shard in range(n_shards):
        path = os.path.join(args.out_dir, f"rows_{shard:05d}.pt")
        if os.path.exists(path):
            continue
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + shard)
        starts = torch.randint(0, train.numel() - args.prompt_len, (args.batch_size,), generator=g).tolist()
        prompts = torch.stack([train[s : s + args.prompt_len].long() for s in starts]).to(device)
        shard_sampling = Sampling(args.temperature, args.top_k, 1.0, torch.Generator(device=device).manual_seed(g.initial_seed() + 1))
        answers, _ = generate_batch(base, prompts.tolist(), row_len - args.prompt_len, shard_sampling)
        with writing_into(args.out_dir, "--out-dir"):  # a disk that fills up
            save_checkpoint(torch.cat([prompts.cpu(), torch.tensor(answers, dtype=torch.long)], 1), path)
        made += 1
        rate = made * args.batch_size * (row_len - args.prompt_len) / (time.time() - t0)
        left = sum(not os.path.exists(os.path.join(args.out_dir, f"rows_{i:05d}.pt")) for i in range(n_shards))
        print(f"shard {shard + 1}/{n_shards} | {rate:,.0f} generated tok/s | ETA "
              f"{fmt_time(left * args.batch_size * (row_len - args.prompt_len) / rate)}", flush=True)
    out_meta["n_rows"] = n_shards * args.batch_size
    with writing_into(args.out_dir, "--out-dir"), open(meta_path, "w") as f:
        json.dump(out_meta, f, indent=1)
    print(f"done: {out_meta['n_rows']} rows of {row_len} tokens in {args.out_dir}")
    return 0


# ---------------------------------------------------------------------------------------------
# prompts mode: answering prompts in batches


def sha256_file(*paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def load_prompts(path, max_prompts: int = 0):
    """(train records, held-out records, sha256 of the file(s)) from a chat_prompts.py folder or a
    prompt file (split by chat_prompts' hash rule)."""
    if os.path.isdir(path):
        train, heldout = read_prompt_folder(path)
        digest = sha256_file(os.path.join(path, "train.jsonl"), os.path.join(path, "heldout.jsonl"))
    else:
        records = read_prompt_file(path)
        train, heldout = split_prompts(records)
        digest = sha256_file(path)
    if max_prompts:
        train = train[:max_prompts]
    if not train:
        raise UserError(f"{path} holds no training prompts (only {len(heldout)} held-out); add prompts")
    if not heldout:
        raise UserError(f"{path} holds no held-out prompts; give at least two prompts (or a chat_prompts.py folder "
                        f"with a non-empty heldout.jsonl)")
    return train, heldout, digest


def load_base_for_prompts(path, device):
    """(base, tokenizer, description dict) from anything checkpoint.open_model reads."""
    if not os.path.exists(path):
        raise UserError(f"--base {path} not found: pass a .gguf file, a Hugging Face model folder or a .pt checkpoint")
    base, _, tok, info = open_model(path, device)
    return base, tok, {"base_format": info["format"], "base_sha256": state_sha256(base.state_dict()),
                       "stop_ids": sorted(set(info["stop_ids"]))}


# what must match for a rerun to continue a folder (paths may move; contents may not)
RESUME_KEYS = ("kind", "mode", "base_sha256", "tokenizer_sha256", "vocab_size", "prompts_sha256", "max_prompts",
               "chat", "stop_ids", "temperature", "top_k", "top_p", "seed", "max_new_tokens", "batch_size")


def check_same_job(out_dir, meta_path, meta: dict):
    """A rerun into a folder that holds a meta.json must be the same job: every RESUME_KEYS entry
    of `meta` equals the saved one (one line naming the first that differs)."""
    if not os.path.exists(meta_path):
        return
    try:
        with open(meta_path, encoding="utf-8") as f:
            saved = json.load(f)
    except ValueError:
        raise UserError(f"{meta_path} is not readable JSON; pick a new --out-dir") from None
    diff = [k for k in RESUME_KEYS if k in meta and saved.get(k) != meta[k]]
    if diff:
        k = diff[0]
        raise UserError(f"{out_dir} was made with other settings ({k} {str(saved.get(k))[:40]!r} there, "
                        f"{str(meta.get(k))[:40]!r} now); rerun with the same flags or pick a new --out-dir")


def pack(conversations, row_len: int, fill_id: int):
    """Conversations [(ids, response mask)] -> (tokens LongTensor (N, row_len), response BoolTensor
    (N, row_len), fill): concatenated in order and cut into rows; the last row is filled up with
    fill_id (response False). N >= 1."""
    ids = [t for c, _ in conversations for t in c]
    mask = [m for _, r in conversations for m in r]
    n = max(1, -(-len(ids) // row_len))
    fill = n * row_len - len(ids)
    tokens = torch.tensor(ids + [fill_id] * fill, dtype=torch.long).view(n, row_len)
    response = torch.tensor(mask + [False] * fill, dtype=torch.bool).view(n, row_len)
    return tokens, response, fill


def conversation(rec: dict, end_id: int):
    """(ids, response mask) of one answered prompt: prompt + answer (+ end_id after a cut answer)."""
    p, r = rec["prompt_ids"], rec["response_ids"]
    extra = [] if rec["stopped"] else [end_id]
    return p + r + extra, [False] * len(p) + [True] * len(r) + [False] * len(extra)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def run_prompts(args):
    """Prompts mode: the base answers the prompts in batches (resumable shards), then the
    conversations are packed into rows with a response mask (module docstring)."""
    path = args.base or args.base_ckpt
    if not path:
        raise UserError("--prompts needs --base MODEL (a .gguf file, a Hugging Face folder or a .pt checkpoint)")
    if args.tokens != 1_000_000 or args.prompt_len != 32:
        raise UserError("--tokens and --prompt-len belong to corpus mode; with --prompts, use --max-prompts and "
                        "--max-new-tokens")
    batch_size = 32 if args.batch_size is None else args.batch_size
    max_new = 256 if args.max_new_tokens is None else args.max_new_tokens
    top_p = 1.0 if args.top_p is None else args.top_p
    row_len = args.row_len or 512
    for flag, v in (("--batch-size", batch_size), ("--max-new-tokens", max_new), ("--row-len", row_len),
                    ("--rows-per-file", args.rows_per_file)):
        if v < 1:
            raise UserError(f"{flag} must be >= 1, got {v}")
    if args.seed < 0 or args.top_k < 0 or args.max_prompts < 0:
        raise UserError("--seed, --top-k and --max-prompts must be >= 0")
    Sampling(args.temperature, args.top_k, top_p)  # validates them before anything is loaded
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out-dir {args.out_dir!r} is a file; pass a folder")
    train, heldout, prompts_sha = load_prompts(args.prompts, args.max_prompts)
    meta_path = os.path.join(args.out_dir, "meta.json")
    # the settings that need no model, compared before it loads (the rest once it has)
    check_same_job(args.out_dir, meta_path, {"kind": "self-distilled", "mode": "prompts", "prompts_sha256": prompts_sha,
                                             "max_prompts": args.max_prompts, "temperature": args.temperature,
                                             "top_k": args.top_k, "top_p": top_p, "seed": args.seed,
                                             "max_new_tokens": max_new, "batch_size": batch_size})
    device = pick_device(args.device)
    t_load = time.time()
    base, tok, about = load_base_for_prompts(path, device)
    has_chat = getattr(tok, "chat_format", None) is not None
    if args.chat == "true" and not has_chat:
        raise UserError(f"{path} has no chat format this code knows (ChatML); pass --chat false to continue the "
                        f"prompts as plain text")
    chat = has_chat if args.chat == "auto" else args.chat == "true"
    end_of_turn = getattr(tok, "end_of_turn_id", None)
    stop_ids = sorted(set(about["stop_ids"]) | {tok.eot_id} | ({end_of_turn} if chat and end_of_turn is not None
                                                                 else set()))
    end_id = end_of_turn if chat and end_of_turn is not None else tok.eot_id
    tok_meta = tok.meta()
    tok_sha = tok_meta.get("sha256") or hashlib.sha256(json.dumps(tok_meta, sort_keys=True).encode()).hexdigest()
    V = base.config.vocab_size
    print(f"base: {path} ({about['base_format']}, {base.num_params() / 1e6:.1f}M parameters, loaded in "
          f"{time.time() - t_load:.1f}s) | {'chat format' if chat else 'plain text'} | stop ids {stop_ids}")

    # every prompt's ids, sorted by length into batches (train and held-out together)
    items, skipped = [], 0
    limit = base.config.context_len - max_new
    for split, records in (("train", train), ("heldout", heldout)):
        for index, rec in enumerate(records):
            ids = tok.encode_chat(rec["prompt"]) if chat else tok.encode(rec["prompt"])
            if 0 < len(ids) <= limit:
                items.append({"split": split, "index": index, "id": rec["id"], "prompt_ids": ids})
            else:
                skipped += 1
    if not any(it["split"] == "train" for it in items) or not any(it["split"] == "heldout" for it in items):
        raise UserError(f"no training or no held-out prompt fits the base's context ({base.config.context_len}) "
                        f"with --max-new-tokens {max_new}; lower --max-new-tokens or use shorter prompts")
    items.sort(key=lambda it: (len(it["prompt_ids"]), it["split"], it["index"]))
    shards = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

    meta = {"kind": "self-distilled", "mode": "prompts", "base": os.path.abspath(path), **about,
            "tokenizer": tok_meta, "tokenizer_sha256": tok_sha, "vocab_size": V, "dtype": token_dtype(V),
            "eot_id": tok.eot_id, "end_of_turn_id": end_of_turn if chat else None, "mask_id": tok.mask_id,
            "prompts": os.path.abspath(args.prompts), "prompts_sha256": prompts_sha, "max_prompts": args.max_prompts,
            "chat": chat, "stop_ids": stop_ids, "temperature": args.temperature, "top_k": args.top_k, "top_p": top_p,
            "seed": args.seed, "max_new_tokens": max_new, "batch_size": batch_size,
            "n_prompts": {"train": len(train), "heldout": len(heldout), "skipped_too_long": skipped},
            "n_shards": len(shards)}
    if os.path.exists(meta_path):  # resuming: it must be the same job
        check_same_job(args.out_dir, meta_path, meta)
    elif os.path.isdir(args.out_dir) and any(f.startswith(("gen_", "rows_", "val_rows_")) for f in os.listdir(args.out_dir)):
        raise UserError(f"{args.out_dir} holds shards but no meta.json; pick a new --out-dir")
    if not os.path.exists(meta_path):
        with writing_into(args.out_dir, "--out-dir"):
            os.makedirs(args.out_dir, exist_ok=True)  # (held by this run, unless --pack-into reads it)
            write_json(meta_path, meta)

    if args.pack_into:  # what exists so far, elsewhere: head training can start while generation goes on
        present = [s for s in range(len(shards)) if os.path.exists(os.path.join(args.out_dir, f"gen_{s:05d}.jsonl"))]
        if os.path.abspath(args.pack_into) == os.path.abspath(args.out_dir):
            raise UserError("--pack-into must be another folder than --out-dir (where generation goes on)")
        return pack_shards(args.out_dir, args.pack_into, present, dict(meta, partial=f"{len(present)}/{len(shards)} shards"),
                           row_len, args.rows_per_file, tok, end_id, skipped)

    # generate: one shard per batch, each sampled from its own seed
    t0, made_tokens, made_prompts = time.time(), 0, 0
    todo = [s for s in range(len(shards)) if not os.path.exists(os.path.join(args.out_dir, f"gen_{s:05d}.jsonl"))]
    left_prompts = sum(len(shards[s]) for s in todo)
    for s in todo:
        batch = shards[s]
        gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + s)
        sampling = Sampling(args.temperature, args.top_k, top_p, gen)
        answers, stopped = generate_batch(base, [it["prompt_ids"] for it in batch], max_new, sampling, stop_ids,
                                          pad_id=tok.eot_id)
        shard_path = os.path.join(args.out_dir, f"gen_{s:05d}.jsonl")
        with writing_into(args.out_dir, "--out-dir"):  # a disk that fills up
            with open(shard_path + ".tmp", "w", encoding="utf-8") as f:
                for it, a, st in zip(batch, answers, stopped):
                    f.write(json.dumps({**it, "response_ids": a, "stopped": st, "response": tok.decode(a)},
                                       ensure_ascii=False) + "\n")
            os.replace(shard_path + ".tmp", shard_path)
        made_tokens += sum(map(len, answers))
        made_prompts += len(batch)
        left_prompts -= len(batch)
        elapsed = time.time() - t0
        print(f"shard {s + 1}/{len(shards)} | {made_tokens / elapsed:,.1f} generated tok/s | "
              f"{made_tokens / made_prompts:.0f} tokens/answer | ETA {fmt_time(elapsed / made_prompts * left_prompts)}",
              flush=True)

    return pack_shards(args.out_dir, args.out_dir, range(len(shards)), meta, row_len, args.rows_per_file, tok, end_id,
                       skipped, expected=len(items))


def pack_shards(src_dir, out_dir, shard_ids, meta, row_len, rows_per_file, tok, end_id, skipped, expected=None):
    """Pack the conversations of shards `shard_ids` of src_dir into rows in out_dir (see PACKED
    FORMAT), write its meta.json, print a summary."""
    records = []
    for s in shard_ids:
        with open(os.path.join(src_dir, f"gen_{s:05d}.jsonl"), encoding="utf-8") as f:
            records += [json.loads(line) for line in f]
    if expected is not None and len(records) != expected:
        raise RuntimeError(f"{len(records)} answers in the shards for {expected} prompts")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # a previous packing (another --row-len, or interrupted)
        if name.startswith(("rows_", "val_rows_")) and name.endswith(".pt"):
            os.remove(os.path.join(out_dir, name))
    split_recs = {sp: sorted((r for r in records if r["split"] == sp), key=lambda r: r["index"])
                  for sp in ("train", "heldout")}
    if not split_recs["train"] or not split_recs["heldout"]:
        raise UserError(f"the shards packed so far hold no {'training' if not split_recs['train'] else 'held-out'} "
                        "answers yet; wait for more shards")
    tokens, response, fill = pack([conversation(r, end_id) for r in split_recs["train"]], row_len, tok.eot_id)
    val_tokens, val_response, _ = pack([conversation(r, end_id) for r in split_recs["heldout"]], row_len, tok.eot_id)
    with writing_into(out_dir, "--out-dir" if expected is not None else "--pack-into"):  # a disk that fills up
        for i in range(0, tokens.size(0), rows_per_file):
            save_checkpoint({"tokens": tokens[i:i + rows_per_file].clone(),
                             "response": response[i:i + rows_per_file].clone()},
                            os.path.join(out_dir, f"rows_{i // rows_per_file:05d}.pt"))
        save_checkpoint({"tokens": val_tokens, "response": val_response}, os.path.join(out_dir, "val_rows_00000.pt"))

    n_resp = sum(len(r["response_ids"]) for r in records)
    n_stop = sum(r["stopped"] for r in records)
    summary = {"conversations": len(records), "train_conversations": len(split_recs["train"]),
               "heldout_conversations": len(split_recs["heldout"]),
               "tokens": sum(len(r["prompt_ids"]) + len(r["response_ids"]) + (not r["stopped"]) for r in records),
               "response_tokens": n_resp, "mean_response_len": round(n_resp / len(records), 2),
               "stopped_at_end_id": n_stop, "hit_max_new_tokens": len(records) - n_stop,
               "train_response_tokens": int(response.sum()), "fill_tokens": fill}
    meta = dict(meta, row_len=row_len, n_rows=tokens.size(0), n_val_rows=val_tokens.size(0), val="rows",
                rows_per_file=rows_per_file, summary=summary)
    write_json(os.path.join(out_dir, "meta.json"), meta)
    print(f"done: {summary['conversations']} conversations ({summary['train_conversations']} train, "
          f"{summary['heldout_conversations']} held-out), {summary['tokens']:,} tokens, {n_resp:,} response tokens, "
          f"mean response {summary['mean_response_len']:.1f} tokens; {n_stop} stopped at an end id, "
          f"{summary['hit_max_new_tokens']} hit --max-new-tokens"
          + (f"; {skipped} prompts too long, skipped" if skipped else ""))
    print(f"packed: {tokens.size(0)} rows + {val_tokens.size(0)} val rows of {row_len} tokens in {out_dir}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    set_threads(args.threads)
    # the folder this run writes, held before anything is loaded: one run at a time, and a
    # read-only folder is refused now (--pack-into only reads --out-dir, where generation goes on)
    folder, flag = (args.pack_into, "--pack-into") if args.prompts and args.pack_into else (args.out_dir, "--out-dir")
    with hold_folder(folder, flag):
        return run_prompts(args) if args.prompts else run_corpus(args)


if __name__ == "__main__":
    run_cli(main)

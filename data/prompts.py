"""
Prompt sets: reading a user's prompt file, the held-out split, one record per prompt. Shared by
data/chat_prompts.py (which builds the offline prompt set), data/self_distill.py (which has the
base answer them) and bench.py (which decodes the held-out ones).

A record is {"id", "prompt", "kind", "source"}. A prompt is held out by a hash of its text, so it
never changes sides between runs or prompt-set sizes (heldout_score < the held-out fraction).
"""

import hashlib
import json
import os

from errors import UserError


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def heldout_score(prompt: str) -> float:
    """Where the prompt falls in [0, 1): held out when below the held-out fraction."""
    return int(sha("heldout:" + prompt)[:15], 16) / 16 ** 15


def record(prompt: str, kind: str, source: str) -> dict:
    return {"id": f"{kind}-{sha(prompt)[:12]}", "prompt": prompt, "kind": kind, "source": source}


def read_prompt_file(path, fmt: str = "auto"):
    """[record] from a user's file: JSONL with a "prompt" field, or plain text (one prompt per
    line; blank-line separated blocks when the file holds a blank line). Bad input: UserError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"prompt file {path} not found" + (" (it is a folder; pass a file)" if os.path.isdir(path) else ""))
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {path} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}); "
                        f"save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"prompt file {path} is empty: write one prompt per line, or JSONL lines like "
                        f'{{"prompt": "..."}}')
    first = text.lstrip()[:1]
    if fmt == "auto":
        fmt = "jsonl" if path.lower().endswith((".jsonl", ".json")) or first == "{" else "text"
    name = os.path.basename(path)
    out = []
    if fmt == "jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path} line {lineno} is not valid JSON ({getattr(e, 'msg', e)}); each line must "
                                f'be one object like {{"prompt": "..."}}') from None
            if not isinstance(obj, dict) or "prompt" not in obj:
                raise UserError(f'{path} line {lineno} has no "prompt" field; each line must be one object like '
                                f'{{"prompt": "..."}}')
            prompt = obj["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(f'{path} line {lineno}: "prompt" must be a non-empty string, got {prompt!r:.60}')
            kind = obj.get("kind") if isinstance(obj.get("kind"), str) and obj.get("kind") else "user"
            source = obj.get("source") if isinstance(obj.get("source"), str) else f"{name}:{lineno}"
            out.append(record(prompt, kind, source))
    elif fmt == "text":
        lines = text.splitlines()
        if any(not line.strip() for line in "\n".join(lines).strip("\n").splitlines()):  # a blank line inside
            block, start = [], None
            for lineno, line in enumerate(lines + [""], 1):
                if line.strip():
                    start = start or lineno
                    block.append(line)
                elif block:
                    out.append(record("\n".join(block).strip(), "user", f"{name}:{start}"))
                    block, start = [], None
        else:
            out = [record(line.strip(), "user", f"{name}:{i}") for i, line in enumerate(lines, 1) if line.strip()]
    else:
        raise UserError(f"unknown prompt file format {fmt!r}: use auto, jsonl or text")
    return out


def split_prompts(records, heldout_fraction: float = 0.05, max_train=None):
    """(train, heldout) lists, in the given order: a prompt is held out by the hash of its text
    (heldout_score); stop after max_train training prompts. Always at least one held-out prompt
    when there are two or more prompts (the one with the lowest score)."""
    train, heldout = [], []
    for r in records:
        if max_train is not None and len(train) >= max_train:
            break
        (heldout if heldout_score(r["prompt"]) < heldout_fraction else train).append(r)
    if not heldout and len(train) >= 2:
        lowest = min(train, key=lambda r: heldout_score(r["prompt"]))
        train.remove(lowest)
        heldout.append(lowest)
    return train, heldout


def read_prompt_folder(folder):
    """(train, heldout) records of a folder written by this script."""
    got = []
    for name in ("train.jsonl", "heldout.jsonl"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise UserError(f"{folder} has no {name}: make the prompts with `python data/chat_prompts.py --out-dir "
                            f"{folder}`, or pass a prompt file")
        got.append(read_prompt_file(path, "jsonl"))
    return got[0], got[1]

"""
Prompts for a chat model, made offline from what is on this machine: the instruction side of the
self-distillation data (data/self_distill.py --prompts) for Orthrus' head (arXiv 2605.12825, Sec.
3.3 trains it on ~600K prompts, math : code : chat = 1 : 1 : 1, answered by the base itself).

Built-in set (no download), three groups taken in turn (1 : 1 : 1 while each lasts):
  code  from the Python standard library's own source (data/prepare.py's file list, test suites
        excluded), one function at a time, parsed with `ast`:
          write     "Write a Python function `name(args)` that returns ..." (its docstring's first
                    line, the imperative "Return ..." turned into "returns ...");
          explain   "Explain what this Python code does:" + a short function (4-30 lines);
          complete  "Complete this Python function:" + the first half of a function (6-40 lines);
  chat  plain-English tasks: a fixed list of topics x task kinds ("Explain X to a beginner.",
        "Write a short email ...", "List three facts about X." ...) and everyday questions;
  math  arithmetic and word problems from templates with numbers drawn from fixed seeds.
Within a kind, prompts are ordered by the sha256 of their text (a shuffle that depends on nothing
but the text); exact duplicates are dropped; prompts over --max-chars characters are skipped.

Your own prompts instead (--input FILE): JSONL, one object per line with a "prompt" string (other
fields are kept as "source" text), chosen for a .jsonl/.json name or a first line starting with
"{"; any other file is plain text: one prompt per line, or, when the file holds a blank line,
blank-line separated blocks (so a prompt may span several lines). An empty file, a file that is
not UTF-8, a JSONL line that does not parse or lacks "prompt": one line each (errors.UserError).

Held-out split: a prompt is held out when the sha256 of "heldout:" + its text, read as a number in
[0, 1), is below --heldout-fraction (default 0.05): it depends on the text alone, so a prompt is on
the same side in every run, whatever --max-prompts or the other prompts are (when no prompt falls
below the threshold, the one closest to it is held out, so there is always one). Held-out prompts
are never training prompts: self_distill.py makes the validation rows from them.

Output (--out-dir, default data/chat_prompts): train.jsonl and heldout.jsonl, one JSON object per
line, {"id", "prompt", "kind", "source"} (id = kind + "-" + the first 12 hex digits of the
prompt's sha256), and info.json (counts per kind, the settings, the Python version whose stdlib was
read). --max-prompts N stops after N training prompts (the held-out prompts are those met on the
way). Running the same command twice gives byte-identical files (same Python stdlib).

    python data/chat_prompts.py --max-prompts 3000                 # -> data/chat_prompts/{train,heldout}.jsonl
    python data/chat_prompts.py --input my_prompts.txt --out-dir data/my_prompts
"""

import ast
import json
import os
import random
import re
import sys
import textwrap

DATA = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DATA)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # so `python data/chat_prompts.py` finds the repository's modules

from cli import ArgumentParser, check_writable, run_cli, writing_into  # noqa: E402
from data.corpus import find_files, read_utf8, stdlib_root  # noqa: E402
from data.prompts import read_prompt_file, record, sha, split_prompts  # noqa: E402,F401 (read_prompt_file: tests use it here)
from errors import UserError  # noqa: E402

GROUPS = ("code", "chat", "math")
CODE_KINDS = ("write", "explain", "complete")

TOPICS = [
    "photosynthesis", "the water cycle", "compound interest", "black holes", "the French Revolution",
    "machine learning", "vaccines", "recycling", "the stock market", "volcanoes", "climate change",
    "the internet", "electric cars", "sleep", "coffee", "honey bees", "the Roman Empire", "renewable energy",
    "gravity", "DNA", "public libraries", "chess", "meditation", "the Moon", "rainbows", "earthquakes",
    "baking bread", "solar panels", "the human heart", "the printing press", "inflation", "time zones",
    "the immune system", "plate tectonics", "the Olympic Games", "composting", "jazz music", "the Great Wall of China",
    "electricity", "the periodic table", "bicycles", "the ocean tides", "cloud computing", "password security",
    "healthy eating", "the Renaissance", "dinosaurs", "antibiotics", "tea", "the Amazon rainforest",
    "budgeting", "public speaking", "open-source software", "the Mars rovers", "magnets", "migrating birds",
    "the speed of light", "rain forests", "spreadsheets", "learning a new language",
]
TOPIC_TASKS = [
    ("explain", "Explain {t} to a beginner."),
    ("summary", "Give a one-paragraph summary of {t}."),
    ("facts", "List three facts about {t}."),
    ("child", "Describe {t} in simple words for a ten-year-old."),
    ("misconceptions", "What are common misconceptions about {t}?"),
    ("quiz", "Write three quiz questions about {t}, with their answers."),
    ("why", "Why does {t} matter? Answer in a few sentences."),
    ("email", "Write a short email to a friend recommending a talk about {t}."),
    ("poem", "Write a short poem about {t}."),
    ("story", "Write a very short story in which {t} plays a part."),
    ("plan", "Make a one-week plan for learning the basics of {t}."),
    ("compare", "Compare {t} and {u}: what do they have in common?"),
    ("questions", "What are three good questions to ask an expert on {t}?"),
    ("tweet", "Write a tweet about {t}."),
]
HOWTOS = [
    "boil an egg", "write a cover letter", "start running", "keep a plant alive indoors", "learn to touch type",
    "make a budget", "prepare for a job interview", "change a flat bicycle tire", "make friends in a new city",
    "take better notes", "save money on groceries", "fall asleep faster", "write a good email subject line",
    "organize a small closet", "plan a birthday party", "stay focused while studying", "brew good coffee at home",
    "give constructive feedback", "pack for a weekend trip", "remember people's names", "start a journal",
    "clean a laptop keyboard", "make a simple tomato sauce", "choose a good password", "back up my photos",
    "prepare a short presentation", "reduce screen time", "learn to juggle", "teach a child to ride a bike",
    "write a thank-you note",
]
EVERYDAY = [
    ("howto", "How do I {h}? Give short steps."),
    ("howto-mistakes", "What are the most common mistakes people make when they {h}?"),
]


# ---------------------------------------------------------------------------------------------
# built-in prompts


VERBS_ES = ("s", "sh", "ch", "x", "z", "o")
NOT_VERBS = {"the", "this", "these", "that", "a", "an", "if", "for", "used", "internal", "helper", "private", "same",
             "like", "deprecated", "no", "not", "all", "each", "some", "one", "it", "called", "see", "note",
             "obsolete", "alias", "simple", "wrapper", "decorator", "default", "new", "only", "when", "how", "what",
             "whether", "true", "false", "in", "on", "as", "is", "are", "with", "from", "to", "by", "xxx", "todo",
             "given", "since", "unless", "because", "here", "there", "an", "any", "every", "most", "many"}


def third_person(line: str):
    """"Return the sum of x." -> "returns the sum of x" (None when the line does not start with an
    imperative or third-person verb: "The ...", "Helper for ...", "Called when ...")."""
    line = line.strip().rstrip(".").strip()
    m = re.match(r"([A-Z][a-z]+)(\s.*)", line, re.S)  # a word, then a space: not "Don't"
    if not m:
        return None
    verb, rest = m.group(1).lower(), m.group(2)
    if verb in NOT_VERBS or verb.endswith(("ed", "ing", "ly", "al", "ion", "er", "or", "ble", "ful", "ive")):
        return None  # an article, a noun, an adjective, a participle
    if verb.endswith("s") and verb.endswith(("ments", "ions", "ers", "ties", "ness")):
        return None  # a plural noun: "Replacements for ..."
    if verb.endswith("s") and not verb.endswith(("ss", "us", "is")):
        return verb + rest  # already third person: "Returns ..."
    if verb.endswith("y") and verb[-2] not in "aeiou":
        verb = verb[:-1] + "ies"
    elif verb.endswith(VERBS_ES):
        verb += "es"
    else:
        verb += "s"
    return verb + rest


def stdlib_files():
    """(relative name, text) of the stdlib's *.py files, test suites excluded, sorted, UTF-8 only."""
    root = stdlib_root()
    for name in find_files(root, ["*.py"], include_tests=False):
        text = read_utf8(os.path.join(root, name))
        if text is not None:
            yield name, text


def code_prompts(files, max_chars: int):
    """{kind: [record]} for write / explain / complete from (name, text) source files."""
    out = {k: [] for k in CODE_KINDS}
    for name, text in files:
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            where = f"stdlib:{name}:{node.lineno}:{node.name}"
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            body = textwrap.dedent("\n".join(lines[start:node.end_lineno])).rstrip()
            n_lines = body.count("\n") + 1
            doc = ast.get_docstring(node)
            first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
            if (id(node) in top and not node.name.startswith("_") and 10 <= len(first) <= 160
                    and first.endswith(".")):
                does = third_person(first)
                args = ", ".join(a.arg for a in node.args.posonlyargs + node.args.args)
                if does:
                    out["write"].append(record(f"Write a Python function `{node.name}({args})` that {does}.",
                                               "write", where))
            if 4 <= n_lines <= 30 and len(body) <= max_chars - 60 and "\t" not in body:
                out["explain"].append(record(f"Explain what this Python code does:\n\n```python\n{body}\n```",
                                             "explain", where))
            # complete: the signature and docstring, then the first half of the code after them
            opened = (node.body[0].end_lineno if doc else node.body[0].lineno - 1) - start  # lines kept whole
            rest = n_lines - opened
            if 6 <= n_lines <= 40 and rest >= 4 and "\t" not in body:
                head = "\n".join(body.splitlines()[: opened + rest // 2])
                out["complete"].append(record(f"Complete this Python function:\n\n```python\n{head}\n```",
                                              "complete", where))
    return out


def chat_prompts():
    out = []
    for i, t in enumerate(TOPICS):
        u = TOPICS[(i + 7) % len(TOPICS)]
        for task, template in TOPIC_TASKS:
            out.append(record(template.format(t=t, u=u), "chat", f"template:{task}:{t}"))
    for h in HOWTOS:
        for task, template in EVERYDAY:
            out.append(record(template.format(h=h), "chat", f"template:{task}:{h}"))
    return out


MATH_TEMPLATES = [
    ("multiply", lambda r: f"What is {r.randint(12, 99)} times {r.randint(12, 99)}? Show your work."),
    ("shop", lambda r: f"A pencil costs {r.randint(15, 95)} cents. How much do {r.randint(3, 40)} pencils cost, "
                       f"in dollars?"),
    ("linear", lambda r: f"Solve for x: {r.randint(2, 12)}x + {r.randint(1, 50)} = {r.randint(51, 200)}."),
    ("percent", lambda r: f"What is {r.choice([5, 10, 12, 15, 20, 25, 30, 40, 75])}% of {r.randint(20, 900)}?"),
    ("speed", lambda r: f"A train travels {r.randint(60, 600)} km in {r.randint(2, 8)} hours. What is its average "
                        f"speed?"),
    ("rectangle", lambda r: f"A rectangle is {r.randint(2, 30)} cm wide and {r.randint(2, 30)} cm long. What are "
                            f"its area and perimeter?"),
    ("minutes", lambda r: f"How many hours and minutes are {r.randint(61, 1000)} minutes?"),
    ("gcd", lambda r: f"What is the greatest common divisor of {r.randint(12, 200)} and {r.randint(12, 200)}?"),
    ("prime", lambda r: f"Is {r.randint(20, 500)} a prime number? Explain why or why not."),
    ("sum", lambda r: f"What is the sum of the whole numbers from 1 to {r.randint(10, 200)}?"),
    ("ages", lambda r: (lambda a, d: f"Anna is {a} years old and her brother is {d} years younger. How old will "
                                      f"her brother be in {r.randint(2, 15)} years?")(r.randint(10, 60), r.randint(1, 9))),
    ("share", lambda r: f"{r.randint(2, 9)} friends share {r.randint(20, 200)} dollars equally. How much does each "
                        f"get?"),
]


def math_prompts(per_template: int = 120):
    out = []
    for name, make in MATH_TEMPLATES:
        r = random.Random(f"orthrus-math-{name}")  # str seeds are hashed with sha512: stable across runs
        for _ in range(per_template):
            out.append(record(make(r), "math", f"template:math:{name}"))
    return out


def interleave(lists):
    """Round robin over lists until all are used up: [a0, b0, c0, a1, b1, ...]."""
    out, iters = [], [iter(x) for x in lists]
    while iters:
        alive = []
        for it in iters:
            item = next(it, None)
            if item is not None:
                out.append(item)
                alive.append(it)
        iters = alive
    return out


def dedupe_and_cap(records, max_chars: int, seen: set):
    out = []
    for r in records:
        if len(r["prompt"]) <= max_chars and r["prompt"] not in seen:
            seen.add(r["prompt"])
            out.append(r)
    return out


def builtin_prompts(groups=GROUPS, max_chars: int = 1500, files=None):
    """Every built-in prompt in the order they are taken: groups in turn (code kinds in turn within
    code), each kind ordered by the sha256 of the prompt text. files: (name, text) pairs of source
    code (default: the stdlib's)."""
    seen, lists = set(), []
    for group in groups:
        if group == "code":
            by_kind = code_prompts(stdlib_files() if files is None else files, max_chars)
            kinds = [sorted(dedupe_and_cap(by_kind[k], max_chars, seen), key=lambda r: sha(r["prompt"]))
                     for k in CODE_KINDS]
            lists.append(interleave(kinds))
        elif group == "chat":
            lists.append(sorted(dedupe_and_cap(chat_prompts(), max_chars, seen), key=lambda r: sha(r["prompt"])))
        elif group == "math":
            lists.append(sorted(dedupe_and_cap(math_prompts(), max_chars, seen), key=lambda r: sha(r["prompt"])))
        else:
            raise UserError(f"unknown prompt group {group!r}: use {', '.join(GROUPS)}")
    return interleave(lists)


# ---------------------------------------------------------------------------------------------
# a user's file of prompts


# ---------------------------------------------------------------------------------------------
# the split and the files


def write_jsonl(path, records):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build_parser():
    p = ArgumentParser(__doc__)
    p.add_argument("--out-dir", default=os.path.join(DATA, "chat_prompts"), help="where train.jsonl, heldout.jsonl "
                   "and info.json go (default: data/chat_prompts)")
    p.add_argument("--input", default=None, metavar="FILE", help="your own prompts (JSONL with a \"prompt\" field, "
                   "or plain text) instead of the built-in set")
    p.add_argument("--format", choices=["auto", "jsonl", "text"], default="auto",
                   help="how to read --input (default: auto, by the file name / first character)")
    p.add_argument("--groups", default=",".join(GROUPS), help="built-in groups to take, comma-separated, in turn "
                   "(default: code,chat,math)")
    p.add_argument("--max-prompts", type=int, default=0, help="training prompts at most (0 = all)")
    p.add_argument("--max-chars", type=int, default=1500, help="skip prompts longer than this (default: 1500)")
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="share of prompts held out (default: 0.05)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_prompts < 0 or args.max_chars < 1:
        raise UserError("--max-prompts must be >= 0 and --max-chars >= 1")
    if not 0.0 < args.heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction must be in (0, 1), got {args.heldout_fraction}")
    check_writable(args.out_dir, "--out-dir")  # before the prompts are read or built
    if args.input:
        records = read_prompt_file(args.input, args.format)
        n_read = len(records)
        seen, kept = set(), []
        for r in records:  # the same text twice would be one prompt on both... sides: keep the first
            if len(r["prompt"]) <= args.max_chars and r["prompt"] not in seen:
                seen.add(r["prompt"])
                kept.append(r)
        records = kept
        if not records:
            raise UserError(f"none of the {n_read} prompts in {args.input} is at most --max-chars {args.max_chars} "
                            f"characters long; raise --max-chars")
    else:
        groups = [g.strip() for g in args.groups.split(",") if g.strip()]
        if not groups or any(g not in GROUPS for g in groups):
            raise UserError(f"--groups {args.groups!r}: pick from {', '.join(GROUPS)}, comma-separated")
        records = builtin_prompts(groups, args.max_chars)
    train, heldout = split_prompts(records, args.heldout_fraction, args.max_prompts or None)
    with writing_into(args.out_dir, "--out-dir"):
        os.makedirs(args.out_dir, exist_ok=True)
        write_jsonl(os.path.join(args.out_dir, "train.jsonl"), train)
        write_jsonl(os.path.join(args.out_dir, "heldout.jsonl"), heldout)
    counts = {}
    for split, rs in (("train", train), ("heldout", heldout)):
        for r in rs:
            counts.setdefault(split, {}).setdefault(r["kind"], 0)
            counts[split][r["kind"]] += 1
    info = {"n_train": len(train), "n_heldout": len(heldout), "kinds": counts,
            "input": os.path.abspath(args.input) if args.input else None,
            "groups": None if args.input else args.groups, "max_prompts": args.max_prompts,
            "max_chars": args.max_chars, "heldout_fraction": args.heldout_fraction,
            "python": sys.version.split()[0]}
    with writing_into(args.out_dir, "--out-dir"), open(os.path.join(args.out_dir, "info.json"), "w",
                                                        encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(counts.get("train", {}).items()))
    print(f"{len(train)} training prompts ({kinds}) and {len(heldout)} held-out prompts -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    run_cli(main)

"""Finding and reading the text files of a corpus (data/prepare.py and data/chat_prompts.py)."""

import os
import sysconfig
from fnmatch import fnmatch

TEST_DIRS = {"test", "tests", "idle_test"}
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root():
    return sysconfig.get_paths()["stdlib"]


def find_files(root, patterns, include_tests=True):
    """Relative posix paths of the files under root whose name matches a pattern, sorted.

    Never descends into site-packages, dist-packages, __pycache__ or hidden folders; test-suite
    folders (test, tests, idle_test) only when include_tests.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                       and (include_tests or d not in TEST_DIRS)]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if any(fnmatch(name, pat) for pat in patterns):
                found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(found)


def read_utf8(path):
    """The file's text, exactly (no newline translation), or None if it is not valid UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None

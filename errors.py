"""
The one exception type for mistakes in what a user gave us (flags, files, prompts, API arguments).

Scripts print a UserError as one line, `error: ...`, and exit with code 2 (cli.run_cli). Every
other exception is a defect in our own code and keeps its traceback: internal invariants fail
loudly (assert, RuntimeError), never dressed up as a user mistake.

It subclasses ValueError so that library callers who catch ValueError for bad arguments keep
working; run_cli catches UserError only.
"""


class UserError(ValueError):
    """A mistake in the user's input, stated in one line: what was wrong and how to fix it."""


def first_line(error: BaseException, limit: int = 120) -> str:
    """An exception's message cut to its first line (an empty message gives its type's name)."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]

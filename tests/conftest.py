"""Make the flat repository root importable from tests (nanoGPT-style layout, no package)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# The test models are tiny (thousands of parameters): their ops are too small to share between
# threads, and on a 2-core machine OpenMP threads spin-waiting on each other (or on another
# process) make them many times slower. One thread for the whole session.
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A made-up corpus, its prepared data and a tiny base and base+head trained once per session
    (helpers.tiny_run); tests treat the files as read-only."""
    from helpers import tiny_run

    return tiny_run(tmp_path_factory)

"""Tests for sampling.py: argument checks, temperature / top-k / top-p warping, draws, argmax.

CPU, float64 where exactness matters, seeded generators only (no global RNG state).
"""
import ast
import math
import os

import pytest
import torch

from errors import UserError
from sampling import GREEDY, Sampling, greedy, logits_to_probs, sample_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_probs(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """Plain-Python float64 reference: scale, top-k, softmax, nucleus by a sorted scan, renormalise."""
    V = len(logits)
    x = [l / temperature for l in logits]
    if 0 < top_k < V:
        kth = sorted(x, reverse=True)[top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    p = [v / s for v in e]
    if top_p < 1.0:
        order = sorted(range(V), key=lambda i: -p[i])
        kept, cum = [], 0.0
        for i in order:
            if cum >= top_p:
                break
            kept.append(i)
            cum += p[i]
        p = [p[i] if i in kept else 0.0 for i in range(V)]
        s = sum(p)
        p = [v / s for v in p]
    return p


@pytest.mark.parametrize("temperature, top_k, top_p, what", [
    (-0.5, 0, 1.0, "temperature"),
    (float("nan"), 0, 1.0, "temperature"),
    (float("inf"), 0, 1.0, "temperature"),
    (1.0, -1, 1.0, "top_k"),
    (1.0, 2.5, 1.0, "top_k"),
    (1.0, 0, 0.0, "top_p"),
    (1.0, 0, -0.1, "top_p"),
    (1.0, 0, 1.5, "top_p"),
    (1.0, 0, float("nan"), "top_p"),
    (1e-40, 0, 1.0, "temperature"),
    (1e-320, 0, 1.0, "temperature"),
    (True, 0, 1.0, "temperature"),
])
def test_bad_args_raise_with_useful_message(temperature, top_k, top_p, what):
    """Validated once, when the settings are built (the CLI and the public decode functions)."""
    with pytest.raises(UserError) as err:
        Sampling(temperature, top_k, top_p)
    msg = str(err.value)
    assert msg.startswith(what) and "\n" not in msg
    assert "got" in msg or "too small" in msg              # says what was passed
    assert any(hint in msg for hint in ("greedy", "disables"))  # says what the valid values mean


def test_good_args_pass():
    for t, k, p in [(0.0, 0, 1.0), (0.7, 50, 0.9), (2, 1, 1e-6), (1.0, 0, 1), (1e-4, 0, 1.0)]:
        Sampling(t, k, p)
    assert GREEDY.is_greedy and not Sampling(0.5).is_greedy


def test_smallest_temperature_gives_a_proper_distribution():
    """The smallest accepted temperature still gives finite, normalised probabilities."""
    logits = torch.tensor([30.0, 29.9999, -50.0, 12.0])
    p = Sampling(1e-4).probs(logits)
    assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-6 and float(p[2]) == 0.0


def test_temperature_zero_is_not_a_division():
    with pytest.raises(ValueError, match="greedy"):
        logits_to_probs(torch.zeros(4), 0.0)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.7])
def test_temperature_matches_softmax_float64(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=g, dtype=torch.float64) * 3
    probs = logits_to_probs(logits, temperature)
    assert probs.dtype == torch.float64 and probs.shape == logits.shape
    torch.testing.assert_close(probs, torch.softmax(logits / temperature, dim=-1), rtol=0, atol=1e-15)


def test_compute_dtype():
    logits = torch.randn(2, 7)
    assert logits_to_probs(logits, 1.0).dtype == torch.float32
    assert logits_to_probs(logits.bfloat16(), 1.0, top_p=0.9).dtype == torch.float32
    assert logits_to_probs(logits.double(), 1.0, top_k=3).dtype == torch.float64


def test_top_k_keeps_exactly_k():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 20, generator=g, dtype=torch.float64)  # continuous: no ties
    for k in (1, 3, 19):
        probs = logits_to_probs(logits, 0.8, top_k=k)
        kept = probs > 0
        assert kept.sum(-1).tolist() == [k] * 6
        top = torch.topk(logits, k, dim=-1).indices
        assert kept.gather(-1, top).all()
        # renormalised softmax over the kept logits
        ref = torch.softmax((logits / 0.8).masked_fill(~kept, float("-inf")), dim=-1)
        torch.testing.assert_close(probs, ref, rtol=0, atol=1e-15)


def test_top_k_ties_at_kth_value_are_all_kept():
    logits = torch.tensor([1.0, 2.0, 2.0, 0.0, 2.0], dtype=torch.float64)
    assert (logits_to_probs(logits, 1.0, top_k=2) > 0).tolist() == [False, True, True, False, True]
    assert (logits_to_probs(logits, 1.0, top_k=4) > 0).tolist() == [True, True, True, False, True]


def test_top_k_at_least_vocab_is_disabled():
    logits = torch.randn(2, 5, dtype=torch.float64)
    for k in (5, 100):
        torch.testing.assert_close(logits_to_probs(logits, 1.3, top_k=k), logits_to_probs(logits, 1.3),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("top_k", [0, 4])
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_top_p_minimal_nucleus_matches_python_reference(seed, top_k, top_p):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 9, generator=g, dtype=torch.float64) * 2
    temperature = 0.9
    probs = logits_to_probs(logits, temperature, top_k=top_k, top_p=top_p)
    for row, got in zip(logits.tolist(), probs):
        ref = torch.tensor(reference_probs(row, temperature, top_k, top_p), dtype=torch.float64)
        assert ((got > 0) == (ref > 0)).all(), (got, ref)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
        # Minimality, stated directly on the un-nucleused distribution.
        full = torch.tensor(reference_probs(row, temperature, top_k, 1.0), dtype=torch.float64)
        kept_mass = full[got > 0].sum().item()
        smallest_kept = full[got > 0].min().item()
        assert kept_mass >= top_p - 1e-12
        assert kept_mass - smallest_kept < top_p


def test_top_p_always_keeps_top_token():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9]], dtype=torch.float64)
    probs = logits_to_probs(logits, 1.0, top_p=1e-9)
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_top_p_boundary_and_ties():
    """probs exactly [0.5, 0.25, 0.25, 0]: reaching top_p exactly stops the nucleus (>=), and
    tokens tied with the smallest kept probability are kept (same tie rule as top-k)."""
    logits = torch.tensor([math.log(2), 0.0, 0.0, float("-inf")], dtype=torch.float64)
    assert torch.softmax(logits, -1).tolist() == [0.5, 0.25, 0.25, 0.0]   # exact in float64
    assert logits_to_probs(logits, 1.0, top_p=0.5).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert logits_to_probs(logits, 1.0, top_p=0.5 + 1e-9).tolist() == [0.5, 0.25, 0.25, 0.0]


def test_rows_are_independent():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 12, generator=g, dtype=torch.float64)
    batched = logits_to_probs(logits, 0.7, top_k=6, top_p=0.8)
    for i in range(5):
        single = logits_to_probs(logits[i], 0.7, top_k=6, top_p=0.8)
        torch.testing.assert_close(batched[i], single, rtol=0, atol=1e-15)
    changed = logits.clone()
    changed[2] = torch.randn(12, generator=g, dtype=torch.float64) * 10
    other = logits_to_probs(changed, 0.7, top_k=6, top_p=0.8)
    keep = [0, 1, 3, 4]
    torch.testing.assert_close(other[keep], batched[keep], rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_probabilities_sum_to_one(dtype, tol):
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(3, 2, 50, generator=g) * 4).to(dtype)
    for t, k, p in [(1.0, 0, 1.0), (0.5, 10, 1.0), (1.5, 0, 0.7), (0.8, 7, 0.5)]:
        probs = logits_to_probs(logits, t, top_k=k, top_p=p)
        assert (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 2, dtype=dtype), rtol=0, atol=tol)


def test_sample_from_reproducible_and_shaped():
    probs = torch.softmax(torch.randn(2, 3, 10), dim=-1)
    a = sample_from(probs, torch.Generator().manual_seed(7))
    b = sample_from(probs, torch.Generator().manual_seed(7))
    assert a.shape == (2, 3) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert sample_from(probs[0, 0], torch.Generator().manual_seed(7)).shape == ()


def test_sample_from_never_draws_zero_probability():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.5, 0.0]).expand(2000, 5)
    draws = sample_from(probs, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 3}


def test_greedy_is_argmax_first_on_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -3.0, 0.5, 0.4]])
    assert greedy(logits).tolist() == [1, 0, 2]


def test_choose_temperature_zero_is_greedy():
    logits = torch.randn(4, 6)
    assert torch.equal(Sampling(0.0, generator=torch.Generator().manual_seed(0)).choose(logits), greedy(logits))
    a = Sampling(0.9, top_k=3, generator=torch.Generator().manual_seed(1)).choose(logits)
    b = Sampling(0.9, top_k=3, generator=torch.Generator().manual_seed(1)).choose(logits)
    assert torch.equal(a, b)


def test_imports_only_torch():
    tree = ast.parse(open(os.path.join(ROOT, "sampling.py")).read())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods <= {"torch", "math", "dataclasses", "errors"}  # errors.py is plain Python

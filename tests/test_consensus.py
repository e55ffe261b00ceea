"""Tests for consensus.py: the verifier's exactness (enumerated and empirical) and edge cases.

The exact tests enumerate every branch of speculative sampling (which draft was drawn, accepted
or rejected) with the same building blocks speculative_verify uses (acceptance_probability,
residual_distribution) and check the emitted law equals p_target to 1e-9 in float64. The
empirical test then checks speculative_verify itself against p_target.
"""
import ast
import math
import os

import pytest
import torch

from consensus import (acceptance_histogram, acceptance_probability, greedy_verify,
                       residual_distribution, speculative_verify)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 5


def random_dist(g: torch.Generator, zeros: list[int] = ()) -> torch.Tensor:
    """A random float64 distribution over V tokens with exact zeros at `zeros`."""
    w = torch.rand(V, generator=g, dtype=torch.float64) + 0.05
    w[list(zeros)] = 0.0
    return w / w.sum()


def dist_pairs(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(p_target, p_draft) pairs covering the cases that matter for the residual."""
    g = torch.Generator().manual_seed(seed)
    same = random_dist(g)
    near = same.clone()
    near[0] += 1e-6                      # move 1e-6 of mass from token 1 to token 0
    near[1] -= 1e-6
    one_hot = torch.zeros(V, dtype=torch.float64)
    one_hot[seed % V] = 1.0
    return {
        "full_support": (random_dist(g), random_dist(g)),
        "draft_mass_where_target_zero": (random_dist(g, zeros=[0, 3]), random_dist(g)),
        "target_mass_where_draft_zero": (random_dist(g), random_dist(g, zeros=[1, 2, 4])),
        "both_have_private_support": (random_dist(g, zeros=[0]), random_dist(g, zeros=[4])),
        "disjoint_supports": (random_dist(g, zeros=[0, 1]), random_dist(g, zeros=[2, 3, 4])),
        "equal": (same, same.clone()),
        "nearly_equal": (same, near),    # residual mass 1e-6: a tolerance fallback would bias
        "deterministic_drafter": (random_dist(g), one_hot),
    }


CASES = [(seed, name) for seed in range(4) for name in dist_pairs(0)]


def emitted_law(p_target: torch.Tensor, p_draft: torch.Tensor) -> torch.Tensor:
    """Exact law of the token one verify step emits at a position, by enumerating branches:
    draw x ~ p_draft; accept (emit x) with acceptance_probability, else emit ~ residual."""
    residual = residual_distribution(p_target, p_draft)
    law = torch.zeros(V, dtype=torch.float64)
    for x in range(V):
        if p_draft[x] == 0:                      # never drawn
            continue
        a = acceptance_probability(p_target[x], p_draft[x])
        law[x] += p_draft[x] * a
        law += p_draft[x] * (1 - a) * residual
    return law


@pytest.mark.parametrize("seed, case", CASES)
def test_one_position_exact_enumeration_equals_target(seed, case):
    p_target, p_draft = dist_pairs(seed)[case]
    torch.testing.assert_close(emitted_law(p_target, p_draft), p_target, rtol=0, atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("draft_depends_on_d1", [False, True])
def test_two_position_exact_enumeration_equals_target_chain(seed, draft_depends_on_d1):
    """K-1 = 2 drafts. The AR target for position 2 depends on the token at position 1
    (P2[y1] is a row of a table), as in a real verify pass (row 1 is conditioned on d_1).
    The drafts are d1 ~ q1 and d2 ~ Q2[d1] (a diffusion view drafts d2 without seeing d1:
    rows of Q2 all equal). Enumerate every (d1, d2, accept/reject) branch; after a rejection
    at position 1 the cycle ends and the next cycle emits position 2 from target P2[y1] with a
    fresh draft (drawn here from Q2[y1]). The joint law of the first two committed tokens must
    be p1(y1) * P2[y1](y2)."""
    g = torch.Generator().manual_seed(100 + seed)
    p1 = random_dist(g, zeros=[seed % V])
    P2 = torch.stack([random_dist(g, zeros=[(y + seed) % V]) for y in range(V)])   # (V, V)
    q1 = random_dist(g, zeros=[(seed + 2) % V])
    if draft_depends_on_d1:
        Q2 = torch.stack([random_dist(g, zeros=[(y + 1) % V]) for y in range(V)])  # (V, V)
    else:
        Q2 = random_dist(g, zeros=[(seed + 3) % V]).expand(V, V)

    joint = torch.zeros(V, V, dtype=torch.float64)    # joint[y1, y2]
    r1 = residual_distribution(p1, q1)
    for d1 in range(V):
        if q1[d1] == 0:
            continue
        a1 = acceptance_probability(p1[d1], q1[d1])
        # Rejected at position 1: y1 ~ residual, then the next cycle emits position 2.
        for y1 in range(V):
            joint[y1] += q1[d1] * (1 - a1) * r1[y1] * emitted_law(P2[y1], Q2[y1])
        # Accepted d1 (y1 = d1): position 2 is verified in this same block, target row P2[d1].
        r2 = residual_distribution(P2[d1], Q2[d1])
        for d2 in range(V):
            if Q2[d1, d2] == 0:
                continue
            a2 = acceptance_probability(P2[d1, d2], Q2[d1, d2])
            joint[d1, d2] += q1[d1] * a1 * Q2[d1, d2] * a2
            joint[d1] += q1[d1] * a1 * Q2[d1, d2] * (1 - a2) * r2
    torch.testing.assert_close(joint, p1[:, None] * P2, rtol=0, atol=1e-9)


def test_speculative_verify_empirical_frequencies():
    """speculative_verify itself, K-1 = 2, position-independent rows.

    The first committed token (d1 if n >= 1, else the correction) must be ~ p_target[0]; given
    d1 was accepted, the second (d2 if n >= 2, else the correction) must be ~ p_target[1].
    Threshold: each cell's frequency within 5 standard errors sqrt(p (1 - p) / N) of its
    probability. The generator is seeded, so the test is deterministic; for an unlucky seed
    the chance of a false failure is below (2 V + 1) * 6e-7 < 1e-5 (a two-sided 5-sigma tail
    per checked cell, normal approximation, union bound over the cells). Tokens with p_target = 0 have standard
    error 0, so they must never be emitted. N = 6000 keeps the loop around a second or two.
    """
    g = torch.Generator().manual_seed(1234)
    p_target = torch.stack([random_dist(g, zeros=[0]), random_dist(g, zeros=[4]), random_dist(g)])
    p_draft = torch.stack([random_dist(g, zeros=[2]), random_dist(g, zeros=[1])])
    N = 6000
    drafts = torch.multinomial(p_draft, N, replacement=True, generator=g).T          # (N, 2)
    first = torch.zeros(V, dtype=torch.float64)
    second = torch.zeros(V, dtype=torch.float64)
    for d in drafts:
        n, tok = speculative_verify(d, p_draft, p_target, g)
        emitted = d[:n].tolist() + [tok]
        first[emitted[0]] += 1
        if n >= 1:
            second[emitted[1]] += 1
    for counts, p in ((first, p_target[0]), (second, p_target[1])):
        total = counts.sum()
        se = (p * (1 - p) / total).sqrt()
        assert ((counts / total - p).abs() <= 5 * se).all(), (counts / total, p)
    # Accepting d1 happens with probability sum_x min(p_draft, p_target) (module docstring).
    p_acc = torch.minimum(p_target[0], p_draft[0]).sum()
    assert abs(second.sum() / N - p_acc) <= 5 * math.sqrt(p_acc * (1 - p_acc) / N)


def test_greedy_verify_cases():
    t = torch.tensor
    target = t([3, 1, 4, 1, 5])                                   # K = 5
    assert greedy_verify(t([0, 1, 4, 1]), target) == (0, 3)       # all rejected
    assert greedy_verify(t([3, 1, 9, 1]), target) == (2, 4)       # partial; a later match is ignored
    assert greedy_verify(t([3, 1, 4, 1]), target) == (4, 5)       # all accepted -> bonus = last
    assert greedy_verify(t([], dtype=torch.long), t([7])) == (0, 7)  # K-1 = 0
    n, tok = greedy_verify(t([3, 1, 9, 1]), target)
    assert type(n) is int and type(tok) is int


def test_verify_shape_errors():
    with pytest.raises(ValueError, match="rows"):
        greedy_verify(torch.tensor([1, 2]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="1-D"):
        greedy_verify(torch.tensor([[1, 2]]), torch.tensor([1, 2, 3]))
    p = torch.full((3, V), 1.0 / V, dtype=torch.float64)
    with pytest.raises(ValueError, match="p_draft"):
        speculative_verify(torch.tensor([1, 2]), p, p, None)
    with pytest.raises(ValueError, match="rows"):
        speculative_verify(torch.tensor([1]), p[:1], p, None)


def test_draft_equal_to_target_accepts_everything():
    g = torch.Generator().manual_seed(5)
    for _ in range(50):
        p_target = torch.stack([random_dist(g, zeros=[int(torch.randint(V, (), generator=g))])
                                for _ in range(7)])
        p_draft = p_target[:-1].clone()
        drafts = torch.multinomial(p_draft, 1, generator=g).view(-1)
        n, tok = speculative_verify(drafts, p_draft, p_target, g)
        assert n == 6 and 0 <= tok < V and p_target[6, tok] > 0


def test_zero_target_probability_draft_is_rejected_there():
    """Positions before j have p_draft == p_target (always accepted); at j the draft token has
    target probability 0, so it must be rejected, and the correction never has probability 0."""
    g = torch.Generator().manual_seed(6)
    for trial in range(40):
        j = trial % 4
        p_target = torch.stack([random_dist(g, zeros=[0, 3]) for _ in range(5)])    # K = 5
        p_draft = torch.stack([random_dist(g) for _ in range(4)])
        p_draft[:j] = p_target[:j]
        drafts = torch.multinomial(p_draft, 1, generator=g).view(-1)
        drafts[j] = 3                                              # p_target[j, 3] == 0
        n, tok = speculative_verify(drafts, p_draft, p_target, g)
        assert type(n) is int and type(tok) is int
        assert n == j and 0 <= tok < V and p_target[j, tok] > 0


def test_no_drafts_samples_target_row():
    p_target = torch.zeros(1, V, dtype=torch.float64)
    p_target[0, 2] = 1.0
    empty = torch.zeros(0, V, dtype=torch.float64)
    assert speculative_verify(torch.zeros(0, dtype=torch.long), empty, p_target, None) == (0, 2)


def test_speculative_verify_reproducible():
    g = torch.Generator().manual_seed(8)
    p_target = torch.stack([random_dist(g) for _ in range(4)])
    p_draft = torch.stack([random_dist(g) for _ in range(3)])
    drafts = torch.multinomial(p_draft, 1, generator=g).view(-1)
    runs = [[speculative_verify(drafts, p_draft, p_target, gen) for _ in range(20)]
            for gen in (torch.Generator().manual_seed(9), torch.Generator().manual_seed(9))]
    assert runs[0] == runs[1]


def test_acceptance_probability():
    pt = torch.tensor([0.2, 0.5, 0.0, 0.3], dtype=torch.float64)
    pd = torch.tensor([0.4, 0.5, 0.1, 0.1], dtype=torch.float64)
    assert acceptance_probability(pt, pd).tolist() == [0.5, 1.0, 0.0, 1.0]
    x = torch.rand(1000, dtype=torch.float32) + 1e-6                 # equal -> exactly 1
    assert (acceptance_probability(x, x.clone()) == 1.0).all()


def test_residual_distribution():
    pt = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    pd = torch.tensor([[0.2, 0.4, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    r = residual_distribution(pt, pd)
    torch.testing.assert_close(r[0], torch.tensor([1.0, 0, 0, 0], dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.equal(r[1], pt[1])                   # zero residual mass -> p_target (unreachable)
    g = torch.Generator().manual_seed(10)
    pt, pd = torch.stack([random_dist(g) for _ in range(6)]), torch.stack([random_dist(g) for _ in range(6)])
    r = residual_distribution(pt, pd)
    torch.testing.assert_close(r.sum(-1), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (r[pt <= pd] == 0).all()
    for i in range(6):
        torch.testing.assert_close(residual_distribution(pt[i], pd[i]), r[i], rtol=0, atol=0)


def test_acceptance_histogram():
    assert acceptance_histogram([0, 3, 3, 1], max_drafts=3) == [1, 1, 0, 2]
    assert acceptance_histogram([], max_drafts=2) == [0, 0, 0]
    with pytest.raises(ValueError, match="max_drafts"):
        acceptance_histogram([4], max_drafts=3)


def test_imports_only_torch():
    """consensus.py must stay model-, cache- and sampling-agnostic."""
    tree = ast.parse(open(os.path.join(ROOT, "consensus.py")).read())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert mods == {"torch"}

"""The baselines of benchmarks/drafters.py are exact too: two-model speculative decoding and prompt lookup,
verified by consensus.py, give greedy AR's tokens (float64) and AR's sampling distribution; the
draft model's own KV cache always holds exactly committed tokens."""

import math

import pytest
import torch

from model import GPT, GPTConfig
from errors import UserError
from orthrus import generate, generate_speculative
from sampling import Sampling
from benchmarks.drafters import DraftModelDrafter, PromptLookupDrafter
from test_orthrus import CFG, V, exact_ar_distribution, random_orthrus, trained_orthrus  # noqa: F401 (fixture)


def random_draft_model(seed=11, **cfg):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**CFG, "n_layer": 1, "n_embd": 16, "mlp_hidden": 32, **cfg})).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    return model


class CheckedDrafter(DraftModelDrafter):
    """Before every proposal: the draft model's cache holds only committed tokens, and their K/V
    equal a fresh prefill of the draft model over them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checks = 0

    def propose(self, cache, sequence, n, sampling):
        m = self.cache.length
        assert m < len(sequence)  # at least the pending token is new to it
        if m:
            ref = self.model.new_cache()
            self.model(torch.tensor([sequence[:m]]), ref)
            torch.testing.assert_close(self.cache.k[:, :, :, :m], ref.k[:, :, :, :m], rtol=0, atol=1e-12)
        self.checks += 1
        return super().propose(cache, sequence, n, sampling)


@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_draft_model_greedy_equals_ar(gamma):
    base = random_orthrus()[0]
    for seed in range(3):
        torch.manual_seed(200 + seed)
        prompt = torch.randint(0, V, (4 + seed,)).tolist()
        ref, _ = generate(base, prompt, 30)
        drafter = CheckedDrafter(random_draft_model(seed), gamma, base.config)
        streamed = []
        out, stats = generate_speculative(base, drafter, prompt, 30, on_tokens=streamed.extend)
        assert out == ref == streamed
        # every cycle was checked, except a last one with room for a single token (it drafts nothing)
        assert drafter.checks == stats.cycles - (stats.drafted_per_cycle[-1] == 0) > 0
        assert stats.cycle_tokens == len(out) - 1
        assert stats.forward_passes == sum(d + 1 for d in stats.drafted_per_cycle)


def test_draft_model_that_is_the_base_accepts_everything():
    """The base as its own draft model is an oracle: every cycle accepts all gamma drafts."""
    base = random_orthrus(seed=1)[0]
    prompt, gamma = [1, 2, 3], 4
    out, stats = generate_speculative(base, CheckedDrafter(base, gamma), prompt, 31)
    assert out == generate(base, prompt, 31)[0]
    assert stats.accepted_per_cycle == [gamma] * 6
    assert stats.tokens_per_cycle == gamma + 1


@pytest.mark.parametrize("prompt_len", [50, 62, 63])
def test_both_drafters_near_context_limit(prompt_len):
    base = random_orthrus(seed=2)[0]
    torch.manual_seed(prompt_len)
    prompt = torch.randint(0, V, (prompt_len,)).tolist()
    ref, ref_stats = generate(base, prompt, 40)
    for drafter in (DraftModelDrafter(base, 5), DraftModelDrafter(random_draft_model(), 5), PromptLookupDrafter(5)):
        out, stats = generate_speculative(base, drafter, prompt, 40)
        assert out == ref and len(prompt) + len(out) == 64
        assert stats.stop_reason == ref_stats.stop_reason == "context_limit"


def test_end_of_text_stops_like_ar():
    base = random_orthrus(seed=3)[0]
    prompt = [4, 5, 6]
    ref, _ = generate(base, prompt, 40)
    eos = ref[7]
    ar_out, ar_stats = generate(base, prompt, 40, eos_ids=[eos])
    for drafter in (DraftModelDrafter(base, 4), PromptLookupDrafter(4)):
        out, stats = generate_speculative(base, drafter, prompt, 40, eos_ids=[eos])
        assert out == ar_out and stats.stop_reason == ar_stats.stop_reason == "eos"


def test_prompt_lookup_rule():
    lookup = PromptLookupDrafter(gamma=3, max_ngram=3).lookup
    assert lookup([1, 2, 3, 9, 9, 1, 2, 3], 3) == [9, 9, 1]  # the 3-gram [1,2,3] matched at 0
    assert lookup([5, 1, 2, 7, 1, 2, 8, 1, 2], 2) == [8, 1]  # the LATEST earlier match wins
    assert lookup([4, 2, 6, 7, 3, 2], 3) == [6, 7, 3]  # falls back to a 1-gram
    assert lookup([1, 2, 3, 4], 3) == []  # nothing repeats: no drafts
    assert lookup([7, 7], 5) == [7]  # the match may overlap the suffix, never be it
    assert lookup([1], 3) == []


def test_prompt_lookup_greedy_equals_ar_and_drafts_on_repetitive_text(trained_orthrus):
    """The trained tiny base continues periodic sequences: lookup drafts get accepted."""
    base = trained_orthrus[0]
    accepted = 0
    for prompt in ([1, 2, 3, 4, 5, 6, 1, 2], [7, 8, 9, 7, 8], [10, 11, 20, 21, 3]):
        ref, _ = generate(base, prompt, 40)
        out, stats = generate_speculative(base, PromptLookupDrafter(6), prompt, 40)
        assert out == ref
        accepted += sum(stats.accepted_per_cycle)
        assert stats.forward_passes == stats.cycles  # lookup costs no forward pass
    assert accepted > 40


@pytest.mark.parametrize("which, temperature, N", [("draft-model", 0.9, 1500), ("prompt-lookup", 1.5, 3000)])
def test_sampled_speculative_matches_ar_distribution(which, temperature, N):
    """Same design and threshold argument as test_orthrus.test_sampled_orthrus_matches_ar_distribution:
    N draws of 3-token continuations over 64 outcomes; every cell within 5 standard errors + 1e-3
    of the exact AR probability (per-cell false-failure chance < 6e-7; seeded).
    Prompt lookup drafts a point mass (accepted with probability p_target(d)); the random draft
    model drafts a full distribution: both rejection paths are exercised. For prompt lookup the
    temperature is higher and N larger so the test has power: telling the verifier the wrong
    p_draft (0.5 point mass + 0.5 uniform) moves a cell by ~7 standard errors here, while the
    correct sampler stays near 2."""
    torch.manual_seed(7)
    small = {**CFG, "vocab_size": 4, "n_layer": 1, "n_embd": 16, "mlp_hidden": 16}
    base = GPT(GPTConfig(**small)).double().eval()
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(6.0)
    drafter = DraftModelDrafter(random_draft_model(5, **{"vocab_size": 4}), 2) if which == "draft-model" \
        else PromptLookupDrafter(2, max_ngram=2)
    prompt, n_new, top_k = [0, 1, 0, 1, 2], 3, 3
    exact = exact_ar_distribution(base, prompt, n_new, temperature, top_k)
    g = torch.Generator().manual_seed(0)
    counts, accepted, drafted = {}, 0, 0
    for _ in range(N):
        out, stats = generate_speculative(base, drafter, prompt, n_new, Sampling(temperature, top_k, 1.0, g))
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
        accepted += sum(stats.accepted_per_cycle)
        drafted += sum(stats.drafted_per_cycle)
    assert 0 < accepted < drafted  # both acceptances and rejections happened
    for cont, p in exact.items():
        freq = counts.get(cont, 0) / N
        se = math.sqrt(p * (1 - p) / N)
        assert abs(freq - p) <= 5 * se + 1e-3, (cont, freq, p)


def test_drafter_bad_input():
    base = random_orthrus()[0]
    with pytest.raises(UserError, match="gamma"):
        DraftModelDrafter(random_draft_model(), 0)
    with pytest.raises(UserError, match="vocabulary"):
        DraftModelDrafter(random_draft_model(vocab_size=30), 4, base.config)
    with pytest.raises(UserError, match="context"):
        DraftModelDrafter(random_draft_model(context_len=32), 4, base.config)
    with pytest.raises(UserError, match="min_ngram"):
        PromptLookupDrafter(4, max_ngram=1, min_ngram=2)

"""Orthrus decoding is lossless: greedy output equals greedy AR token for token (float64), and
sampled output follows the AR sampling distribution. Also the cache bookkeeping after every cycle."""

import itertools
import math

import pytest
import torch

from diffusion_head import DiffusionHead, head_loss
from training.anchors import choose_anchors
from model import GPT, GPTConfig
from errors import UserError
from consensus import greedy_verify, greedy_verify_tree
from model import tree_layout
from orthrus import DiffusionDrafter, Proposal, generate, generate_batch, generate_orthrus, generate_speculative
from sampling import GREEDY, Sampling, logits_to_probs
from tree_and_fused import FusedDiffusionDrafter, TreeDrafter, best_first_tree, verify_and_draft

V, MASK = 24, 23
CFG = dict(vocab_size=V, context_len=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=8, mlp_hidden=64)


def random_orthrus(seed=0, **cfg):
    torch.manual_seed(seed)
    base = GPT(GPTConfig(**{**CFG, **cfg})).double().eval()
    with torch.no_grad():  # larger weights than init: peaked, prompt-dependent distributions
        for p in base.parameters():
            p.mul_(4.0)
    head = DiffusionHead(base, MASK).double()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return base, head


class CheckedDrafter(DiffusionDrafter):
    """Records, before every draft, that the cache holds exactly the committed tokens minus the
    pending one (cache length == committed length - 1) and that their K/V equal a fresh prefill."""

    def __init__(self, base, head, prompt, draft_len):
        super().__init__(base, head, draft_len)
        self.prompt, self.committed, self.checks = list(prompt), [], 0

    def propose(self, cache, sequence, n, sampling):
        seq = self.prompt + self.committed
        assert seq == sequence
        assert cache.length == len(seq) - 1
        ref = self.base.new_cache()
        self.base(torch.tensor([seq[:-1]]), ref)
        length = cache.length
        torch.testing.assert_close(cache.k[:, :, :, :length], ref.k[:, :, :, :length], rtol=0, atol=1e-12)
        self.checks += 1
        return super().propose(cache, sequence, n, sampling)


class OracleDrafter(DiffusionDrafter):
    """A head that drafts perfectly: it runs the AR view greedily on a copy of the cache, so every
    cycle must accept all K-1 drafts. Exercises the sampler's bookkeeping at full acceptance."""

    def propose(self, cache, sequence, n, sampling):
        saved_length = cache.length
        k, v = cache.k.clone(), cache.v.clone()
        tok, drafts = sequence[-1], []
        for _ in range(n):
            tok = int(self.base(torch.tensor([[tok]]), cache, logits="last")[0, -1].argmax())
            drafts.append(tok)
        cache.k.copy_(k)
        cache.v.copy_(v)
        cache.crop(saved_length)
        return Proposal(torch.tensor(drafts), None, 1)


def ar_reference(model, prompt, n):
    tokens, _ = generate(model[0], prompt, n)
    return tokens


@pytest.mark.parametrize("draft_len", [2, 3, 5, 8])
def test_greedy_equals_ar_random_untrained(draft_len):
    model = random_orthrus()
    for seed in range(3):
        torch.manual_seed(100 + seed)
        prompt = torch.randint(0, V - 1, (5 + seed,)).tolist()
        ref = ar_reference(model, prompt, 30)
        checked = CheckedDrafter(*model, prompt, draft_len)
        committed = checked.committed
        out, stats = generate_speculative(model[0], checked, prompt, 30, on_tokens=committed.extend)
        assert out == ref
        assert committed == ref  # the stream saw exactly the returned tokens, in order
        # every cycle was checked, except a last one with room for a single token (it drafts nothing)
        assert stats.drafted_per_cycle[:-1].count(0) == 0
        assert checked.checks == stats.cycles - (stats.drafted_per_cycle[-1] == 0) > 0
        assert stats.cycle_tokens == len(out) - 1  # first token comes from prefill
        assert sum(stats.accepted_per_cycle) + stats.cycles >= stats.cycle_tokens  # accepted + one per cycle
        assert all(0 <= a <= draft_len - 1 for a in stats.accepted_per_cycle)


def test_oracle_head_accepts_every_draft():
    model = random_orthrus(seed=1)
    prompt = [1, 2, 3]
    K = 6
    oracle = OracleDrafter(*model, draft_len=K)
    out, stats = generate_speculative(model[0], oracle, prompt, 31)
    assert out == ar_reference(model, prompt, 31)
    assert stats.cycles == 5  # 30 tokens after the prefill token, K per cycle
    assert stats.accepted_per_cycle == [K - 1] * 5
    assert stats.tokens_per_cycle == K


@pytest.mark.parametrize("prompt_len", [50, 58, 62, 63])
def test_greedy_equals_ar_near_context_limit(prompt_len):
    model = random_orthrus(seed=2)
    torch.manual_seed(prompt_len)
    prompt = torch.randint(0, V - 1, (prompt_len,)).tolist()
    ref, ref_stats = generate(model[0], prompt, 40)
    for cls in (DiffusionDrafter, OracleDrafter):
        out, stats = generate_speculative(model[0], cls(*model, draft_len=8), prompt, 40)
        assert out == ref
        assert len(prompt) + len(out) == 64  # stops cleanly at the context length...
        assert stats.stop_reason == ref_stats.stop_reason == "context_limit"  # ...and says so


def test_stops_at_end_of_text_like_ar():
    model = random_orthrus(seed=3)
    prompt = [4, 5, 6]
    ref = ar_reference(model, prompt, 40)
    eos = ref[7]  # pretend a token the model emits is end-of-text
    ar_out, ar_stats = generate(model[0], prompt, 40, eos_ids=[eos])
    out, stats = generate_speculative(model[0], OracleDrafter(*model, draft_len=5), prompt, 40, eos_ids=[eos])
    assert out == ar_out == ref[: ref.index(eos) + 1]
    assert stats.stop_reason == ar_stats.stop_reason == "eos"


def test_bad_decode_arguments_are_user_errors():
    base, head = random_orthrus()
    with pytest.raises(UserError, match="zero tokens"):
        generate_orthrus(base, head, [], 5)
    with pytest.raises(UserError, match="context holds 64"):
        generate(base, [1] * 64, 5)
    with pytest.raises(UserError, match="max_new_tokens"):
        generate(base, [1], 0)
    with pytest.raises(UserError, match="draft length must be >= 2"):
        generate_orthrus(base, head, [1], 5, draft_len=1)
    with pytest.raises(UserError, match="temperature"):
        generate_orthrus(base, head, [1], 5, sampling=Sampling(temperature=-1))
    with pytest.raises(UserError, match="top_p"):
        generate(base, [1], 5, Sampling(temperature=1.0, top_p=0.0))


def test_internal_cache_misuse_is_not_a_user_error():
    """A KV-cache overflow is a bug in our own sizing: a plain exception, never a UserError."""
    base, _ = random_orthrus()
    cache = base.new_cache(capacity=4)
    with pytest.raises(RuntimeError, match="overflow") as err:
        base(torch.zeros(1, 5, dtype=torch.long), cache)
    assert not isinstance(err.value, UserError)


# ---------------------------------------------------------------------------------------------
# A briefly trained tiny model: drafts are mostly right, so long accepted runs are exercised


def periodic_batch(g, B=8, T=48):
    """Sequences that follow one of a few fixed cycles: easy for the base, learnable for the head."""
    cycles = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17]]
    rows = []
    for _ in range(B):
        c = cycles[int(torch.randint(len(cycles), (1,), generator=g))]
        start = int(torch.randint(len(c), (1,), generator=g))
        rows.append([c[(start + t) % len(c)] for t in range(T)])
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def trained_orthrus():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    base = GPT(GPTConfig(**CFG))
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    for _ in range(60):
        idx = periodic_batch(g)
        logits = base(idx[:, :-1], logits="all")
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    base.requires_grad_(False).eval()
    head = DiffusionHead(base, MASK, [6])
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(40):
        idx = periodic_batch(g)
        cache = base.new_cache(batch_size=idx.size(0))
        with torch.no_grad():
            teacher = base(idx, cache, logits="all")
        T = idx.size(1)
        anchors = choose_anchors(T, 6, "random", g)
        logits = head.block_logits_for_training(base, idx, [cache.k[i, :, :, :T] for i in range(2)],
                                                [cache.v[i, :, :, :T] for i in range(2)], anchors, 6)
        loss, _ = head_loss(logits, torch.log_softmax(teacher, -1), idx, anchors, "kl")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return base.double(), head.double().eval()


def test_greedy_equals_ar_briefly_trained(trained_orthrus):
    model = trained_orthrus
    g = torch.Generator().manual_seed(5)
    total_accepted = 0
    for row in periodic_batch(g, B=4, T=7).tolist():
        for prompt in (row, [row[0], 20, 21]):  # on-pattern and off-pattern prompts
            ref = ar_reference(model, prompt, 40)
            out, stats = generate_orthrus(*model, prompt, 40, draft_len=6)
            assert out == ref
            total_accepted += sum(stats.accepted_per_cycle)
    assert total_accepted > 100  # the trained head really drafts: many accepted tokens were checked


def test_multi_step_denoising_is_also_exact(trained_orthrus):
    prompt = [1, 2, 3]
    ref = ar_reference(trained_orthrus, prompt, 30)
    for steps in (2, 3, 7):
        out, stats = generate_orthrus(*trained_orthrus, prompt, 30, draft_len=6, denoise_steps=steps)
        assert out == ref
        assert stats.forward_passes == sum(min(steps, d) + 1 for d in stats.drafted_per_cycle)


# ---------------------------------------------------------------------------------------------
# Sampling: Orthrus' output distribution equals AR sampling's


def exact_ar_distribution(base, prompt, n_new, temperature, top_k):
    """P(continuation) for every continuation of n_new tokens, by the chain rule over the AR
    model's warped next-token distributions (exact enumeration in float64)."""
    probs = {}
    for cont in itertools.product(range(base.config.vocab_size), repeat=n_new):
        seq = torch.tensor([prompt + list(cont)])
        with torch.no_grad():
            logits = base(seq, logits="all")[0, len(prompt) - 1 : -1]  # rows predicting cont
        p = logits_to_probs(logits, temperature, top_k)
        probs[cont] = math.prod(p[i, t].item() for i, t in enumerate(cont))
    return probs


def four_token_pair():
    """A 4-token vocabulary base with peaked, prompt-dependent distributions and a deliberately poor
    (random) head, so rejections, residual resampling and bonus tokens all occur."""
    torch.manual_seed(7)
    base = GPT(GPTConfig(**{**CFG, "vocab_size": 4, "n_layer": 1, "n_embd": 16, "mlp_hidden": 16})).double().eval()
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(6.0)
    head = DiffusionHead(base, 3).double()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return base, head


def test_sampled_orthrus_matches_ar_distribution():
    """Empirical frequencies of 3-token continuations sampled by Orthrus against the exact AR
    distribution (temperature 0.9, top-k 3, a 4-token vocabulary: 64 outcomes).

    Why the threshold is safe: with N = 1500 draws, each cell's frequency has standard error
    sqrt(p(1-p)/N) <= 0.013. We require |freq - p| <= 5 standard errors + 1e-3 for every cell.
    For a correct sampler, a 5-sigma deviation has probability < 6e-7 per cell (normal tail; the
    slack covers small-p cells where the normal approximation is loose), so < 4e-5 over 64
    cells: and the generator is seeded, so the test is deterministic anyway. A biased sampler
    (e.g. accepting drafts without the ratio test, or a wrong residual) moves cells by several
    percent and fails. The draft head is deliberately poor (random), so rejections, residual
    resampling and bonus tokens all occur."""
    base, head = four_token_pair()
    prompt, n_new, temperature, top_k = [0, 1, 2], 3, 0.9, 3
    exact = exact_ar_distribution(base, prompt, n_new, temperature, top_k)
    assert abs(sum(exact.values()) - 1) < 1e-9
    N = 1500
    g = torch.Generator().manual_seed(0)
    counts, accepted = {}, 0
    for _ in range(N):
        out, stats = generate_orthrus(base, head, prompt, n_new, draft_len=3, sampling=Sampling(temperature, top_k, 1.0, g))
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
        accepted += sum(stats.accepted_per_cycle)
    assert 0 < accepted < N * (n_new - 1)  # both acceptances and rejections happened
    for cont, p in exact.items():
        freq = counts.get(cont, 0) / N
        se = math.sqrt(p * (1 - p) / N)
        assert abs(freq - p) <= 5 * se + 1e-3, (cont, freq, p)
    assert set(counts) <= {c for c, p in exact.items() if p > 0}  # never a zero-probability continuation


def test_sampled_multi_step_denoising_matches_ar_distribution():
    """Several denoising passes while sampling (positions fixed left to right) keep the output law
    AR's: 4-token continuations, 3 drafts in 2 passes per cycle, against exact enumeration over 256
    outcomes; same threshold argument as test_sampled_orthrus_matches_ar_distribution (N = 3000:
    standard error <= 0.0092 per cell, bound 5 SE + 1e-3)."""
    base, head = four_token_pair()
    prompt, n_new, temperature, top_k = [0, 1, 2], 4, 0.9, 3
    exact = exact_ar_distribution(base, prompt, n_new, temperature, top_k)
    N, g, counts = 3000, torch.Generator().manual_seed(1), {}
    for _ in range(N):
        out, stats = generate_orthrus(base, head, prompt, n_new, draft_len=4, denoise_steps=2,
                                      sampling=Sampling(temperature, top_k, 1.0, g))
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    assert stats.forward_passes >= 3  # the first cycle drafted in two passes
    for cont, p in exact.items():
        freq = counts.get(cont, 0) / N
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / N) + 1e-3, (cont, freq, p)


# ---------------------------------------------------------------------------------------------
# Token trees: one verify pass over several candidates per position (greedy)


def random_tree(n_nodes, seed):
    g = torch.Generator().manual_seed(seed)
    parents = [-1]
    for i in range(1, n_nodes):
        parents.append(int(torch.randint(-1, i, (1,), generator=g)))  # any earlier node, or the root
    tokens = torch.randint(0, V - 1, (n_nodes,), generator=g).tolist()
    return tokens, parents


def path_to(node, parents):
    path = []
    while node != -1:
        path.append(node)
        node = parents[node]
    return path[::-1]


def test_tree_verify_pass_equals_a_causal_pass_over_each_path_float64():
    """Every node's logits in the one tree pass equal a plain cached forward over the prompt + its
    root-to-node path: the tree mask and the depth positions are right (an off-by-one in either
    changes the logits). Then keeping one path leaves the cache a fresh prefill would build."""
    base, _ = random_orthrus()
    prompt = [3, 7, 1, 9, 4]
    tokens, parents = random_tree(9, seed=5)
    root = 11
    cache = base.new_cache()
    with torch.no_grad():
        base(torch.tensor([prompt]), cache)
        s = cache.length
        block = torch.tensor([[root] + tokens])
        tree_logits = base(block, cache, tree=tree_layout(parents))[0]  # (10, V)
    for row, node in enumerate([-1] + list(range(len(tokens)))):
        path = [] if node == -1 else path_to(node, parents)
        ref = base(torch.tensor([prompt + [root] + [tokens[i] for i in path]]), logits="last")[0, -1]
        torch.testing.assert_close(tree_logits[row], ref, rtol=0, atol=1e-10)
    deepest = max(range(len(tokens)), key=lambda i: len(path_to(i, parents)))
    path = path_to(deepest, parents)
    assert path != list(range(len(path)))  # the kept path is not already in place: slots move
    cache.keep(s + 1, [s + 1 + i for i in path])
    assert cache.length == s + 1 + len(path)
    fresh = base.new_cache()
    base(torch.tensor([prompt + [root] + [tokens[i] for i in path]]), fresh)
    torch.testing.assert_close(cache.k[:, :, :, : cache.length], fresh.k[:, :, :, : cache.length], rtol=0, atol=1e-12)
    torch.testing.assert_close(cache.v[:, :, :, : cache.length], fresh.v[:, :, :, : cache.length], rtol=0, atol=1e-12)


def test_tree_layout_depths_and_ancestors():
    depth, sees = tree_layout([-1, 0, -1, 1, 2])  # root; nodes 0..4 -> tokens 1..5
    assert depth.tolist() == [0, 1, 2, 1, 3, 2]
    assert sees.int().tolist() == [[1, 0, 0, 0, 0, 0],
                                   [1, 1, 0, 0, 0, 0],
                                   [1, 1, 1, 0, 0, 0],
                                   [1, 0, 0, 1, 0, 0],
                                   [1, 1, 1, 0, 1, 0],
                                   [1, 0, 0, 1, 0, 1]]


def test_greedy_verify_tree_on_chains_equals_greedy_verify():
    g = torch.Generator().manual_seed(0)
    for n in range(0, 7):
        for _ in range(30):
            drafts = torch.randint(0, 3, (n,), generator=g)
            target = torch.randint(0, 3, (n + 1,), generator=g)
            n_acc, nxt = greedy_verify(drafts, target)
            path, nxt_tree = greedy_verify_tree(drafts.tolist(), list(range(-1, n - 1)), target.tolist())
            assert (path, nxt_tree) == (list(range(n_acc)), nxt)


def test_greedy_verify_tree_follows_the_matching_branch():
    #        root(argmax 5)
    #        /      \
    #   n0:4        n1:5 (argmax 8)
    #                |     \
    #            n2:7       n3:8 (argmax 2)
    tokens, parents = [4, 5, 7, 8], [-1, -1, 1, 1]
    target = [5, 0, 8, 0, 2]  # after root, after n0, after n1, after n2, after n3
    assert greedy_verify_tree(tokens, parents, target) == ([1, 3], 2)
    assert greedy_verify_tree(tokens, parents, [6, 0, 8, 0, 2]) == ([], 6)  # no child matches: correction


def test_best_first_tree_takes_the_most_probable_nodes():
    """Against brute force: every rank vector (r_1..r_d), r < width, is a node with score
    prod p_j(rank r_j); the tree must hold exactly the n_nodes best (no ties with random probs)."""
    torch.manual_seed(0)
    n, width, vocab = 4, 3, 10
    probs = torch.softmax(torch.randn(n, vocab) * 2, -1).double()
    top_p, top_t = probs.topk(width, -1)
    scored = []
    for d in range(1, n + 1):
        for ranks in itertools.product(range(width), repeat=d):
            score = math.prod(top_p[j, r].item() for j, r in enumerate(ranks))
            scored.append((score, tuple(top_t[j, r].item() for j, r in enumerate(ranks))))
    scored.sort(reverse=True)
    for n_nodes in (1, 5, 12, 30):
        tokens, parents = best_first_tree(probs, n_nodes, width)
        assert len(tokens) == n_nodes and all(p < i for i, p in enumerate(parents))
        got = {tuple(tokens[i] for i in path_to(node, parents)) for node in range(n_nodes)}
        assert got == {path for _, path in scored[:n_nodes]}


@pytest.mark.parametrize("draft_len,nodes,width", [(2, 3, 3), (4, 8, 2), (6, 20, 4)])
def test_tree_greedy_equals_ar_float64(draft_len, nodes, width):
    """Greedy decoding with token trees is AR's greedy output token for token, and some cycles
    accept a path that leaves the chain of top-1 drafts (the branches are really used)."""
    model = random_orthrus()
    off_chain = 0
    for seed in range(3):
        torch.manual_seed(200 + seed)
        prompt = torch.randint(0, V - 1, (4 + seed,)).tolist()

        def watch(c):
            nonlocal off_chain
            if not c["parents"]:
                return  # a last cycle with room for one token drafts nothing
            chain, node = [], -1  # the top-1 drafts: each node's first (most probable) child
            while node in c["parents"]:
                node = c["parents"].index(node)
                chain.append(node)
            off_chain += c["path"] != chain[: len(c["path"])]

        out, stats = generate_speculative(model[0], TreeDrafter(*model, draft_len, nodes, width), prompt, 30,
                                          on_cycle=watch)
        assert out == ar_reference(model, prompt, 30)
        assert stats.tokens_per_cycle >= 1
    assert off_chain > 0


def test_tree_greedy_equals_ar_near_the_context_limit():
    """A tree wider than the tokens left: the cache has room for the whole verify block."""
    model = random_orthrus(context_len=24)
    prompt = list(range(1, 13))
    out, _ = generate_speculative(model[0], TreeDrafter(*model, 6, 16, 3), prompt, 30)
    assert out == ar_reference(model, prompt, 30) and len(out) == 12


def test_sampling_with_a_tree_drafter_keeps_the_chain():
    """Trees are for greedy decoding; sampled decoding with the same drafter drafts a chain (its
    exact acceptance rule), so its output is the chain drafter's, draw for draw."""
    model = random_orthrus()
    prompt = [1, 2, 3]
    runs = []
    for drafter in (DiffusionDrafter(*model, 4), TreeDrafter(*model, 4, 12)):
        s = Sampling(temperature=1.0, generator=torch.Generator().manual_seed(7))
        runs.append(generate_speculative(model[0], drafter, prompt, 25, sampling=s)[0])
    assert runs[0] == runs[1]


# ---------------------------------------------------------------------------------------------
# One forward per cycle: the verify pass also drafts the next block


def test_verify_and_draft_equals_a_verify_pass_and_separate_draft_passes_float64():
    """The fused pass's AR rows and cache writes equal base(block, cache); its prepared block for
    acceptance j equals a draft pass over [MASK x K] once x_s, d_1..d_j are committed. An
    off-by-one in the prefix each prepared block sees, or in its positions, changes these logits."""
    base, head = random_orthrus()
    prompt, block = [3, 7, 1, 9, 4], torch.tensor([[11, 2, 5, 8, 6]])  # [x_s, d_1..d_4]
    K, starts = 5, [0, 1, 2, 4]
    fused_cache, plain_cache = base.new_cache(), base.new_cache()
    with torch.no_grad():
        base(torch.tensor([prompt]), fused_cache)
        base(torch.tensor([prompt]), plain_cache)
        ar, hidden = verify_and_draft(head, base, fused_cache, block, starts, K)
        drafts = base.lm_head(hidden)  # (len(starts), K, V)
        ref = base(block, plain_cache)[0]
    torch.testing.assert_close(ar, ref, rtol=0, atol=1e-10)
    assert fused_cache.length == plain_cache.length == len(prompt) + 5
    torch.testing.assert_close(fused_cache.k, plain_cache.k, rtol=0, atol=1e-12)
    torch.testing.assert_close(fused_cache.v, plain_cache.v, rtol=0, atol=1e-12)
    for b, j in enumerate(starts):
        cache = base.new_cache()
        with torch.no_grad():
            base(torch.tensor([prompt + block[0, : j + 1].tolist()]), cache)
            separate = head.draft_logits(base, cache, torch.full((1, K), MASK))[0]
        torch.testing.assert_close(drafts[b], separate, rtol=0, atol=1e-10)


class CheckedFusedDrafter(FusedDiffusionDrafter):
    """Every prepared block it uses must be the draft a separate MASK-first pass over the LIVE cache
    gives (a block keyed one acceptance off would still decode exactly like AR, only worse)."""

    used = 0

    def propose(self, cache, sequence, n, sampling):
        prepared = cache.length in self.prepared
        proposal = super().propose(cache, sequence, n, sampling)
        if prepared:
            self.used += 1
            with torch.no_grad():
                ref = self.head.draft_logits(self.base, cache, torch.full((1, self.max_drafts + 1), MASK))[0, :n]
            assert torch.equal(proposal.tokens, ref.argmax(-1))
        return proposal


@pytest.mark.parametrize("draft_len", [2, 4, 6])
def test_fused_greedy_equals_ar_and_saves_passes(draft_len):
    model = random_orthrus()
    for seed in range(3):
        torch.manual_seed(300 + seed)
        prompt = torch.randint(0, V - 1, (4 + seed,)).tolist()
        drafter = CheckedFusedDrafter(*model, draft_len)
        out, stats = generate_speculative(model[0], drafter, prompt, 30)
        assert out == ar_reference(model, prompt, 30)
        assert drafter.used > 0 and stats.forward_passes < 2 * stats.cycles  # drafts made inside verify passes


def test_fused_greedy_equals_ar_near_the_context_limit():
    model = random_orthrus(context_len=24)
    prompt = list(range(1, 13))
    out, _ = generate_speculative(model[0], FusedDiffusionDrafter(*model, 6), prompt, 30)
    assert out == ar_reference(model, prompt, 30) and len(out) == 12


def test_sampled_fused_orthrus_matches_ar_distribution():
    """Prepared blocks as p_draft keep the output law AR's: 4-token continuations against exact
    enumeration over 256 outcomes; same threshold argument as the tests above (N = 3000, 5 SE +
    1e-3 per cell). Prepared blocks must actually be used (fewer passes than two per cycle)."""
    base, head = four_token_pair()
    prompt, n_new, temperature, top_k = [0, 1, 2], 4, 0.9, 3
    exact = exact_ar_distribution(base, prompt, n_new, temperature, top_k)
    N, g, counts, passes, cycles = 3000, torch.Generator().manual_seed(2), {}, 0, 0
    for _ in range(N):
        drafter = FusedDiffusionDrafter(base, head, 3, foresee=(0, 1))
        out, stats = generate_speculative(base, drafter, prompt, n_new, sampling=Sampling(temperature, top_k, 1.0, g))
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
        passes, cycles = passes + stats.forward_passes, cycles + stats.cycles
    assert passes < 2 * cycles
    for cont, p in exact.items():
        freq = counts.get(cont, 0) / N
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / N) + 1e-3, (cont, freq, p)


# ---------------------------------------------------------------------------------------------
# batched AR decoding (data/self_distill.py answers prompts with it)


def tiny_gpt(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=260, context_len=256, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=8,
                       mlp_hidden=64)
    model = GPT(config)
    with torch.no_grad():  # peaky logits, so greedy answers vary from prompt to prompt
        model.embed_tokens.weight.mul_(40.0)
    return model.to(dtype).eval().requires_grad_(False)


def test_batched_greedy_equals_one_at_a_time():
    model = tiny_gpt(dtype=torch.float64)
    prompts = [[5, 6, 7], list(range(40, 60)), [9], list(range(100, 111)), [1, 2]]
    for stop in ([], [7]):
        batched, stopped = generate_batch(model, prompts, 12, GREEDY, stop)
        for p, a, s in zip(prompts, batched, stopped):
            alone, alone_stopped = generate_batch(model, [p], 12, GREEDY, stop)
            assert alone[0] == a and alone_stopped[0] == s
    free, _ = generate_batch(model, prompts, 12, GREEDY, [])
    assert len({tuple(a) for a in free}) > 1  # the answers differ: a real test
    for p, a in zip(prompts, free):  # and each is plain AR decoding's, token for token
        assert generate(model, p, 12)[0] == a


def test_rows_stop_at_their_own_end_id():
    model = tiny_gpt(dtype=torch.float64)
    prompts = [[5, 6, 7], list(range(40, 60)), [9], list(range(100, 111)), [1, 2], [200, 201, 3]]
    free, free_stopped = generate_batch(model, prompts, 16, GREEDY, [])
    assert not any(free_stopped) and all(len(a) == 16 for a in free)
    stops = {free[0][2], free[3][5]}  # row 0 stops at step 3 at the latest, row 3 at step 6
    got, stopped = generate_batch(model, prompts, 16, GREEDY, stops)
    for a, s, f in zip(got, stopped, free):
        cut = next((i + 1 for i, t in enumerate(f) if t in stops), None)
        assert a == (f[:cut] if cut else f) and s == (cut is not None)
    assert stopped[0] and stopped[3] and len(got[0]) <= 3
    # without compaction the same answers (compaction only drops finished rows)
    same, _ = generate_batch(model, prompts, 16, GREEDY, stops, compact=False)
    assert same == got


def test_sampled_answers_reproducible():
    model = tiny_gpt()
    prompts = [[5, 6, 7], [9], list(range(40, 50))]
    runs = [generate_batch(model, prompts, 10, Sampling(0.8, 0, 0.9, torch.Generator().manual_seed(3)), [12])
            for _ in range(2)]
    assert runs[0] == runs[1]

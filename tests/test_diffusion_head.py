"""The diffusion view: inference path == training path (float64), and the draft pass reads the
shared cache without touching it."""

import math

import pytest
import torch

from diffusion_head import (DiffusionHead, block_index_weights, choose_anchors, chunked_head_loss, head_loss, response_anchors,
                            training_attention_mask, valid_anchor_range, attention_calls,
                            chunked_block_attention)
from model import GPT, GPTConfig

CFG = dict(vocab_size=40, context_len=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=12, mlp_hidden=48)
MASK_ID = 39


def tiny_pair(seed=0):
    torch.manual_seed(seed)
    base = GPT(GPTConfig(**CFG)).double().eval()
    head = DiffusionHead(base, MASK_ID).double()
    with torch.no_grad():  # make the head differ from the base, as after training
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return base, head


def base_kv(base, idx):
    cache = base.new_cache(batch_size=idx.size(0))
    with torch.no_grad():
        teacher = base(idx, cache, logits="all")
    T = idx.size(1)
    ks = [cache.k[i, :, :, :T] for i in range(base.config.n_layer)]
    vs = [cache.v[i, :, :, :T] for i in range(base.config.n_layer)]
    return teacher, ks, vs


def test_head_starts_as_a_copy_of_the_base_attention():
    torch.manual_seed(0)
    base = GPT(GPTConfig(**CFG))
    head = DiffusionHead(base, MASK_ID)
    for layer, attn in zip(base.layers, head.attn):
        for (n1, p1), (n2, p2) in zip(layer.self_attn.named_parameters(), attn.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    assert torch.equal(head.mask_embedding, base.embed_tokens.weight[MASK_ID])
    # the head's state holds only its own tensors, never the base's
    assert all(k.startswith(("attn.", "mask_embedding")) for k in head.state_dict())


def test_training_path_equals_inference_path_float64():
    base, head = tiny_pair()
    torch.manual_seed(1)
    B, T, K = 2, 40, 6
    idx = torch.randint(0, MASK_ID, (B, T))
    _, ks, vs = base_kv(base, idx)
    anchors = torch.tensor([0, 1, 7, 20, T - K])
    with torch.no_grad():
        train_logits = head.block_logits_for_training(base, idx, ks, vs, anchors, K)  # (B, N, K, V)
    assert train_logits.shape == (B, anchors.numel(), K, 40)
    with torch.no_grad():  # the attention grouping (1, 2, 3 or all blocks per call) changes nothing
        for per_call in (1, 2, 3, 5):
            hidden = head.block_hidden_for_training(base, idx, ks, vs, anchors, K, blocks_per_call=per_call)
            torch.testing.assert_close(base.lm_head(base.norm(hidden)), train_logits, rtol=0, atol=1e-12)
        # unsorted anchors: each group's prefix is its largest anchor, wherever it sits
        order = torch.tensor([3, 0, 4, 2, 1])
        hidden = head.block_hidden_for_training(base, idx, ks, vs, anchors[order], K, blocks_per_call=2)
        torch.testing.assert_close(base.lm_head(base.norm(hidden)), train_logits[:, order], rtol=0, atol=1e-12)
    for j, s in enumerate(anchors.tolist()):
        cache = base.new_cache(batch_size=B)
        with torch.no_grad():
            if s > 0:
                base(idx[:, :s], cache)
            block = torch.full((B, K), MASK_ID)
            block[:, 0] = idx[:, s]
            infer = head.draft_logits(base, cache, block)
        torch.testing.assert_close(train_logits[:, j], infer, rtol=0, atol=1e-12)


def test_mask_first_blocks_train_like_a_draft_pass_over_an_all_mask_block_float64():
    """A block flagged mask_first is [MASK x K] at positions s..s+K-1 (x_s not known yet): the
    training path must equal draft_logits on that block with the cache holding [0, s), and the
    unflagged blocks of the same forward must stay the usual [x_s, MASK x (K-1)]."""
    base, head = tiny_pair()
    torch.manual_seed(2)
    B, T, K = 2, 40, 5
    idx = torch.randint(0, MASK_ID, (B, T))
    _, ks, vs = base_kv(base, idx)
    anchors = torch.tensor([0, 3, 11, 20, T - K])
    flags = torch.tensor([True, False, True, False, True])
    with torch.no_grad():
        train_logits = head.block_logits_for_training(base, idx, ks, vs, anchors, K, mask_first=flags)
        plain = head.block_logits_for_training(base, idx, ks, vs, anchors, K)
    for j, s in enumerate(anchors.tolist()):
        cache = base.new_cache(batch_size=B)
        with torch.no_grad():
            if s > 0:
                base(idx[:, :s], cache)
            block = torch.full((B, K), MASK_ID)
            if not flags[j]:
                block[:, 0] = idx[:, s]
            infer = head.draft_logits(base, cache, block)
        torch.testing.assert_close(train_logits[:, j], infer, rtol=0, atol=1e-12)
        if flags[j]:  # the flag changes the block: a MASK where x_s was gives other logits
            assert (train_logits[:, j] - plain[:, j]).abs().max() > 1e-6
        else:
            torch.testing.assert_close(train_logits[:, j], plain[:, j], rtol=0, atol=1e-12)


@pytest.mark.parametrize("expand_kv_heads", [False, True])
def test_grouped_training_attention_equals_one_masked_call_float64(expand_kv_heads):
    """chunked_block_attention, any grouping, with or without repeating the key/value heads (what
    CUDA gets), equals one attention call over all T + N*K keys under training_attention_mask:
    outputs and gradients, B = 2, GQA 6 query / 2 key-value heads, duplicate and unsorted anchors."""
    torch.manual_seed(4)
    B, H, Hkv, D, T, K = 2, 6, 2, 4, 30, 5
    anchors = torch.tensor([0, 12, 3, 3, 25, 7, 0])
    N = anchors.numel()
    leaves = [torch.randn(B, H, N * K, D, dtype=torch.float64, requires_grad=True)]
    leaves += [torch.randn(B, Hkv, n, D, dtype=torch.float64, requires_grad=True) for n in (T, T, N * K, N * K)]
    q, k_base, v_base, k_block, v_block = leaves
    keys, values = torch.cat([k_base, k_block], 2), torch.cat([v_base, v_block], 2)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=training_attention_mask(anchors, T, K), enable_gqa=True)
    dense_grads = torch.autograd.grad(dense.square().sum(), leaves)
    for per_call in (1, 2, 3, N):
        calls = attention_calls(anchors, T, K, per_call)
        y = chunked_block_attention(q, k_base, v_base, k_block, v_block, calls, expand_kv_heads)
        torch.testing.assert_close(y, dense, rtol=0, atol=1e-13)
        for g, g0 in zip(torch.autograd.grad(y.square().sum(), leaves), dense_grads):
            torch.testing.assert_close(g, g0, rtol=0, atol=1e-12)
    assert [prefix for _, prefix, _ in attention_calls(anchors, T, K, 3)] == [12, 25, 0]


def test_draft_pass_leaves_cache_untouched():
    base, head = tiny_pair()
    idx = torch.randint(0, MASK_ID, (1, 20))
    cache = base.new_cache()
    with torch.no_grad():
        base(idx, cache)
    k_before, v_before, length = cache.k.clone(), cache.v.clone(), cache.length
    block = torch.full((1, 8), MASK_ID)
    block[0, 0] = 3
    with torch.no_grad():
        head.draft_logits(base, cache, block)
    assert cache.length == length
    assert torch.equal(cache.k, k_before) and torch.equal(cache.v, v_before)  # whole buffer, stale slots included


def test_training_mask_shape_and_visibility():
    anchors = torch.tensor([0, 3])
    m = training_attention_mask(anchors, seq_len=5, draft_len=2)
    # block 0 (anchor 0) sees no base key and its own 2 tokens; block 1 sees base 0..2 and its own
    assert m.tolist() == [
        [False, False, False, False, False, True, True, False, False],
        [False, False, False, False, False, True, True, False, False],
        [True, True, True, False, False, False, False, True, True],
        [True, True, True, False, False, False, False, True, True],
    ]


def test_anchor_choice():
    g = torch.Generator().manual_seed(0)
    lo, hi = valid_anchor_range(32, 8)
    assert (lo, hi) == (0, 24)
    assert choose_anchors(32, 8, "aligned", g).tolist() == [0, 8, 16, 24]
    a = choose_anchors(32, 8, "random", g)
    assert a.numel() == 8 and a.unique().numel() == 8 and a.min() >= lo and a.max() <= hi


def test_kl_loss_is_zero_when_head_equals_teacher_and_ce_uses_next_token():
    B, N, K, V = 1, 2, 4, 7
    torch.manual_seed(0)
    teacher = torch.randn(B, 12, V, dtype=torch.float64)
    anchors = torch.tensor([1, 5])
    draft = torch.stack([teacher[:, s : s + K] for s in anchors.tolist()], 1)  # index i == teacher at s+i
    teacher_logp = torch.log_softmax(teacher, -1)  # computed once per position by the trainer
    loss, agreement = head_loss(draft, teacher_logp, torch.zeros(B, 12, dtype=torch.long), anchors, "kl")
    assert abs(loss.item()) < 1e-6 and agreement.shape == (N, K - 1) and bool((agreement == 1).all())
    idx = torch.randint(0, V, (B, 12))
    loss_ce, _ = head_loss(draft, teacher_logp, idx, anchors, "ce")
    ref = torch.nn.functional.cross_entropy(
        torch.cat([teacher[0, s : s + K - 1] for s in anchors.tolist()]),  # float64 in, float64 loss
        torch.cat([idx[0, s + 1 : s + K] for s in anchors.tolist()]))
    torch.testing.assert_close(loss_ce, ref)


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_chunked_loss_equals_the_whole_loss_values_and_gradients(kind):
    """chunked_head_loss (chunks of blocks, recomputed in backward) == head_loss on all logits at
    once, loss, agreement and the head's gradients, in float64; with and without response weights,
    with layer checkpointing too."""
    base, head = tiny_pair()
    torch.manual_seed(3)
    B, T, K = 2, 24, 4
    idx = torch.randint(0, base.config.vocab_size - 1, (B, T))
    cache = base.new_cache(batch_size=B)
    with torch.no_grad():
        teacher_logp = torch.log_softmax(base(idx, cache), -1)
    ks = [cache.k[i, :, :, :T] for i in range(base.config.n_layer)]
    vs = [cache.v[i, :, :, :T] for i in range(base.config.n_layer)]
    anchors = torch.tensor([0, 3, 7, 11, 15, 20])
    weight = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.float64)
    for w, decay in ((None, 0.0), (weight, 0.0), (weight, 1.5)):
        results = []
        for max_logits, ckpt, per_call in ((0, False, 6), (2 * K * base.config.vocab_size, False, 1), (1, True, 4)):
            head.zero_grad()
            hidden = head.block_hidden_for_training(base, idx, ks, vs, anchors, K, checkpoint_layers=ckpt,
                                                    blocks_per_call=per_call)
            loss, agree = chunked_head_loss(base, hidden, teacher_logp, idx, anchors, kind, w, max_logits, decay)
            loss.backward()
            results.append((loss.detach(), agree, [p.grad.clone() for p in head.parameters()]))
        for loss, agree, grads in results[1:]:
            torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(agree, results[0][1], rtol=0, atol=1e-12)
            for g, g0 in zip(grads, results[0][2]):
                torch.testing.assert_close(g, g0, rtol=1e-10, atol=1e-12)


def test_block_index_weights_decay_and_keep_mean_one():
    assert torch.equal(block_index_weights(6, 0.0), torch.ones(5))
    w = block_index_weights(6, 2.0, dtype=torch.float64)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(w[1:] / w[:-1], torch.full((4,), math.exp(-0.5), dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_head_loss_position_decay_weights_each_block_index_float64(kind):
    """The weighted loss is the per-index losses (computed here one index at a time) averaged with
    block_index_weights; the agreement does not depend on the weights."""
    torch.manual_seed(5)
    B, N, K, V, T = 2, 3, 5, 11, 20
    draft = torch.randn(B, N, K, V, dtype=torch.float64)
    teacher_logp = torch.log_softmax(torch.randn(B, T, V, dtype=torch.float64), -1)
    idx = torch.randint(0, V, (B, T))
    anchors = torch.tensor([0, 6, 13])
    loss, agree = head_loss(draft, teacher_logp, idx, anchors, kind, position_decay=1.3)
    per_index = []
    for i in range(K - 1):
        student = torch.log_softmax(draft[:, :, i], -1)  # (B, N, V)
        if kind == "kl":
            p = teacher_logp[:, anchors + i]
            per_index.append((p.exp() * (p - student)).sum(-1).mean())
        else:
            per_index.append(-student.gather(-1, idx[:, anchors + i + 1, None]).mean())
    expected = (torch.stack(per_index) * block_index_weights(K, 1.3, dtype=torch.float64)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=1e-13)
    uniform_loss, uniform_agree = head_loss(draft, teacher_logp, idx, anchors, kind)
    torch.testing.assert_close(uniform_loss, torch.stack(per_index).mean(), rtol=1e-13, atol=1e-13)
    assert torch.equal(agree, uniform_agree) and not torch.isclose(loss, uniform_loss)


def test_response_anchors_need_every_target_to_be_an_answer():
    response = torch.tensor([[0, 0, 1, 1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)  # T = 10
    usable = response_anchors(response, 3)  # targets s+1, s+2
    assert usable.tolist() == [[False, True, True, True, False, False, True, True]]
    allowed = usable.any(0)
    a = choose_anchors(10, 3, "random", torch.Generator().manual_seed(0), allowed=allowed)
    assert set(a.tolist()) <= {1, 2, 3, 6, 7}

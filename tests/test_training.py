"""What makes head training scale, against the reference forms of diffusion_head.py (float64): grouped
attention calls == one masked call, the chunked loss == the whole loss, per-index weights, anchors."""

import math

import pytest
import torch

from diffusion_head import head_loss, training_attention_mask
from test_diffusion_head import tiny_pair
from training.anchors import choose_anchors, response_anchors, valid_anchor_range
from training.attention import attention_calls, chunked_block_attention, grouped_attention
from training.loss import block_index_weights, chunked_head_loss


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


def test_anchor_choice():
    g = torch.Generator().manual_seed(0)
    lo, hi = valid_anchor_range(32, 8)
    assert (lo, hi) == (0, 24)
    assert choose_anchors(32, 8, "aligned", g).tolist() == [0, 8, 16, 24]
    a = choose_anchors(32, 8, "random", g)
    assert a.numel() == 8 and a.unique().numel() == 8 and a.min() >= lo and a.max() <= hi


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
                                                    attention=grouped_attention(per_call))
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
    loss, agree = head_loss(draft, teacher_logp, idx, anchors, kind, index_weight=block_index_weights(K, 1.3, dtype=torch.float64))
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


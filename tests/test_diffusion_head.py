"""The diffusion view: inference path == training path (float64), and the draft pass reads the
shared cache without touching it."""

import torch

from diffusion_head import DiffusionHead, head_loss, training_attention_mask
from model import GPT, GPTConfig
from training.attention import grouped_attention

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
            hidden = head.block_hidden_for_training(base, idx, ks, vs, anchors, K, attention=grouped_attention(per_call))
            torch.testing.assert_close(base.lm_head(base.norm(hidden)), train_logits, rtol=0, atol=1e-12)
        # unsorted anchors: each group's prefix is its largest anchor, wherever it sits
        order = torch.tensor([3, 0, 4, 2, 1])
        hidden = head.block_hidden_for_training(base, idx, ks, vs, anchors[order], K, attention=grouped_attention(2))
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
"""The base model and its KV cache: cached decoding must equal the full forward (float64)."""

import pytest
import torch

from model import GPT, GPTConfig, KVCache, offset_causal_mask

TINY = dict(vocab_size=40, context_len=48, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=12, mlp_hidden=48)


def tiny_model(**overrides):
    torch.manual_seed(0)
    cfg = GPTConfig(**{**TINY, **overrides})
    model = GPT(cfg).double().eval()
    # random norms so q/k norms and layer norms are exercised, not left at ones
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return model


def full_logits(model, idx):
    with torch.no_grad():
        return model(idx, logits="all")


def test_offset_causal_mask():
    m = offset_causal_mask(3, 2)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert offset_causal_mask(0, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("tied", [True, False])
def test_token_by_token_decoding_matches_full_forward(tied):
    model = tiny_model(tie_embeddings=tied)
    torch.manual_seed(1)
    idx = torch.randint(0, 40, (2, 30))
    ref = full_logits(model, idx)
    cache = model.new_cache(batch_size=2)
    out = torch.full_like(ref, float("nan"))  # poisoned: every position must be written
    with torch.no_grad():
        for t in range(idx.size(1)):
            out[:, t] = model(idx[:, t : t + 1], cache, logits="all")[:, 0]
    assert cache.length == 30
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_chunked_decoding_and_last_only_logits():
    model = tiny_model()
    torch.manual_seed(2)
    idx = torch.randint(0, 40, (1, 40))
    ref = full_logits(model, idx)
    cache = model.new_cache()
    pieces, start = [], 0
    with torch.no_grad():
        for size in (7, 1, 5, 12, 3, 9, 3):
            pieces.append(model(idx[:, start : start + size], cache, logits="all"))
            start += size
    torch.testing.assert_close(torch.cat(pieces, 1), ref, rtol=0, atol=1e-12)
    with torch.no_grad():
        last = model(idx, logits="last")
    assert last.shape == (1, 1, 40)
    torch.testing.assert_close(last[:, 0], ref[:, -1], rtol=0, atol=1e-12)


def test_crop_then_redecode_equals_never_going_further():
    model = tiny_model()
    torch.manual_seed(3)
    prefix = torch.randint(0, 40, (1, 20))
    wrong = torch.randint(0, 40, (1, 8))
    right = torch.randint(0, 40, (1, 8))
    ref = full_logits(model, torch.cat([prefix, right], 1))[:, 20:]
    cache = model.new_cache()
    k_ptr = cache.k.data_ptr()
    with torch.no_grad():
        model(prefix, cache)
        model(wrong, cache)  # a rejected draft block
        assert cache.length == 28
        cache.crop(20)  # roll back in O(1)
        out = model(right, cache)
    assert cache.k.data_ptr() == k_ptr  # no reallocation
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_cache_overflow_and_bad_crop_are_clear():
    model = tiny_model()
    cache = KVCache(model.config, 1, capacity=10, dtype=torch.float64)
    with torch.no_grad(), pytest.raises(RuntimeError, match="overflow"):
        model(torch.zeros(1, 11, dtype=torch.long), cache)
    with pytest.raises(RuntimeError, match="cannot crop"):
        cache.crop(5)


def test_gqa_divisibility_error():
    with pytest.raises(ValueError, match="must divide n_head"):
        GPTConfig(n_head=8, n_kv_head=3)


def test_logits_argument_is_explicit():
    model = tiny_model()
    with pytest.raises(ValueError, match="'all' or 'last'"):
        model(torch.zeros(1, 3, dtype=torch.long), logits="every")


def test_qwen3_layout_names():
    """The state-dict keys mirror Hugging Face Qwen3 (without the 'model.' prefix)."""
    keys = set(tiny_model(tie_embeddings=False).state_dict())
    for k in ("embed_tokens.weight", "layers.0.input_layernorm.weight", "layers.1.self_attn.q_norm.weight",
              "layers.0.self_attn.k_norm.weight", "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight",
              "layers.0.post_attention_layernorm.weight", "norm.weight", "lm_head.weight"):
        assert k in keys
    sd = tiny_model(tie_embeddings=False).state_dict()
    assert sd["layers.0.self_attn.k_proj.weight"].shape == (2 * 12, 32)  # (n_kv_head * head_dim, n_embd)
    assert sd["layers.0.self_attn.o_proj.weight"].shape == (32, 4 * 12)  # head_dim * n_head != n_embd here


def test_left_padded_batch_equals_each_row_alone():
    """Rows of different lengths, left-padded and decoded together (prefill, then token by token
    over one cache), give each row's own logits: RoPE is relative, and padded keys are hidden."""
    model = tiny_model()
    torch.manual_seed(4)
    rows = [torch.randint(0, 40, (n,)).tolist() for n in (7, 3, 5)]
    steps = [torch.randint(0, 40, (3, 1)) for _ in range(4)]
    width = max(map(len, rows))
    pad = torch.tensor([width - len(r) for r in rows])
    batch = torch.tensor([[39] * (width - len(r)) + r for r in rows])  # any id works as padding
    cache = model.new_cache(batch_size=3, capacity=width + 4)
    with torch.no_grad():
        got = [model(batch, cache, logits="last", pad=pad)[:, 0]] + [model(s, cache, pad=pad)[:, 0] for s in steps]
        without_cache = model(torch.cat([batch, *steps], 1), logits="all", pad=pad)[:, width - 1 :]
    for b, row in enumerate(rows):
        seq = torch.tensor([row + [int(s[b]) for s in steps]])
        ref = full_logits(model, seq)[0, len(row) - 1 :]  # (5, V)
        torch.testing.assert_close(torch.stack([g[b] for g in got]), ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(without_cache[b], ref, rtol=0, atol=1e-10)

"""decoding.py's bf16 CPU path: prepacked Linear layers compute what plain bf16 F.linear computes."""

import pytest
import torch

from decoding import prepack_bf16_linears
from diffusion_head import DiffusionHead
from model import GPT, GPTConfig
from orthrus import generate_orthrus

NATIVE_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.skipif(not NATIVE_BF16, reason="oneDNN bf16 is not supported on this CPU")
def test_prepacked_bf16_linears_match_plain_bf16():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, context_len=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, mlp_hidden=128)
    plain = GPT(cfg).bfloat16().eval().requires_grad_(False)
    packed = GPT(cfg).bfloat16().eval().requires_grad_(False)
    packed.load_state_dict(plain.state_dict())
    head = DiffusionHead(packed, 63).bfloat16().eval().requires_grad_(False)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in list(packed.modules()) + list(head.modules()))
    assert prepack_bf16_linears(packed, head) == n_linear
    idx = torch.randint(0, 63, (2, 20))
    with torch.no_grad():
        a, b = plain(idx).float(), packed(idx).float()  # 3-D inputs, every layer through oneDNN
    torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)  # bf16 rounding of differently blocked sums
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    out, stats = generate_orthrus(packed, head, [1, 2, 3, 4], 16, draft_len=4)  # decodes through the packed layers
    assert len(out) == 16 and stats.cycles >= 1


def test_prepack_leaves_float32_alone():
    model = GPT(GPTConfig(vocab_size=32, context_len=16, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, head_dim=16,
                          mlp_hidden=32))
    assert prepack_bf16_linears(model) == 0

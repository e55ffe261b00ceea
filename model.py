"""
The autoregressive (AR) base model: a small decoder-only GPT whose block mirrors Qwen3 (the
Orthrus paper's backbone, arXiv 2605.12825, Sec. 3), plus a preallocated, croppable KV cache.
One layer, pre-norm:
    x = x + o_proj(attention(rope(q_norm(q_proj(rms(x)))), rope(k_norm(k_proj(rms(x)))), v_proj(rms(x))))
    x = x + down_proj(silu(gate_proj(rms(x))) * up_proj(rms(x)))
Tensor names are Hugging Face Qwen3's without "model." (pretrained/ maps real models onto this).
The seam for the diffusion view (diffusion_head.py): `Attention.project` and `Attention.o_proj`;
the head owns a second `Attention` per layer and reads the K/V this model wrote into its `KVCache`.
This file knows nothing about the head.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError


def config_field(default, help: str, choices=None):
    """A dataclass field that carries its help text and allowed values (each field becomes a flag)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class GPTConfig:
    vocab_size: int = config_field(258, "token ids 0..vocab_size-1, special ids included (byte tokenizer: 256 + 2)")
    context_len: int = config_field(512, "longest sequence (prompt + generated tokens) the model handles")
    n_layer: int = config_field(6, "number of transformer blocks")
    n_embd: int = config_field(256, "width of the residual stream (Qwen3 hidden_size)")
    n_head: int = config_field(8, "query heads")
    n_kv_head: int = config_field(4, "key/value heads (grouped-query attention); must divide n_head")
    head_dim: int = config_field(32, "per-head width; n_head * head_dim need not equal n_embd, as in Qwen3")
    mlp_hidden: int = config_field(768, "SwiGLU inner width (Qwen3 intermediate_size)")
    rope_theta: float = config_field(10000.0, "RoPE base frequency")
    rms_norm_eps: float = config_field(1e-6, "epsilon of every RMSNorm")
    tie_embeddings: bool = config_field(True, "LM head shares the token-embedding matrix")
    qk_norm: bool = config_field(True, "per-head RMSNorm on q and k before RoPE (Qwen3); false for Llama-family models")

    def __post_init__(self):
        """Every value checked up front (flags and checkpoints come through here): a bad one is a
        UserError naming the field and its flag, never a NaN or a shape error later."""
        def check(names, ok, want):
            for name in names:
                value = getattr(self, name)
                if isinstance(value, bool) != (want == "true or false") or not ok(value):
                    raise UserError(f"{name} (--{name.replace('_', '-')}) must be {want}, got {value!r}")

        check(("vocab_size", "context_len", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "mlp_hidden"),
              lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        check(("rope_theta", "rms_norm_eps"),  # 0, negative, inf or NaN give NaN activations
              lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0, "a finite number > 0")
        check(("tie_embeddings", "qk_norm"), lambda v: True, "true or false")
        if self.n_head % self.n_kv_head != 0:
            raise UserError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}) for grouped-query "
                            f"attention; pick e.g. n_kv_head={math.gcd(self.n_head, self.n_kv_head)}")
        if self.head_dim % 2 != 0:
            raise UserError(f"head_dim (--head-dim) must be even for rotary embeddings, got {self.head_dim}")


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values of every layer, with the committed length as its only state.

    k, v: (n_layer, B, n_kv_head, capacity, head_dim). Slots [0, length) hold committed tokens.
    `crop(n)` rolls back by moving `length` (O(1): no copy, no reallocation); the stale slots past
    it are simply overwritten by the next forward. The decoders size `capacity` to the job (prompt
    plus the tokens they may still commit), not to the model's whole context.

    The cache has no hidden side effects: layers write their K/V at [length, length + T) through
    `write`, and only GPT.forward advances `length`, once, after all layers ran.
    """

    def __init__(self, config: GPTConfig, batch_size: int, capacity: int, device=None, dtype=torch.float32):
        shape = (config.n_layer, batch_size, config.n_kv_head, capacity, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store new keys/values (B, n_kv_head, T, head_dim) at [length, length + T) of one layer and
        return views of that layer's keys and values over [0, length + T)."""
        start, end = self.length, self.length + k.size(2)
        if end > self.capacity:  # a bug in the caller's sizing, never a user mistake
            raise RuntimeError(f"KV cache overflow: {end} positions needed, capacity is {self.capacity}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def committed(self, layer: int):
        """Views (no copy) of one layer's committed keys and values, (B, n_kv_head, length, head_dim)."""
        return self.k[layer, :, :, : self.length], self.v[layer, :, :, : self.length]

    def crop(self, n: int):
        if not 0 <= n <= self.length:
            raise RuntimeError(f"cannot crop the KV cache to {n}: it holds {self.length} positions")
        self.length = n

    def keep(self, start: int, slots: list):
        """Move the K/V of `slots` (increasing, each >= its target) to [start, start + len(slots)) and
        crop there: after a token tree was verified, the accepted root-to-leaf path becomes the
        contiguous continuation of the cache and every other branch is dropped."""
        if slots != list(range(start, start + len(slots))):
            source = torch.tensor(slots, device=self.k.device)
            self.k[:, :, :, start : start + len(slots)] = self.k[:, :, :, source]  # gathered (a copy), then written
            self.v[:, :, :, start : start + len(slots)] = self.v[:, :, :, source]
        self.crop(start + len(slots))

    def keep_rows(self, rows: torch.Tensor):
        """Keep only these batch rows (a finished sequence leaves a batch): a copy of those rows."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


def kv_bytes(config: GPTConfig, positions: int, dtype=torch.float32) -> int:
    """Bytes of K and V for `positions` tokens, all layers: a cache's size, or one draft block's (K)."""
    element = torch.empty((), dtype=dtype).element_size()
    return config.n_layer * 2 * positions * config.n_kv_head * config.head_dim * element


# ---------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if x.dtype != self.weight.dtype:  # autocast: bf16 q/k with an fp32 weight has no fused kernel
            wide = torch.promote_types(x.dtype, self.weight.dtype)  # normalise in the wider dtype
            return F.rms_norm(x.to(wide), (x.size(-1),), self.weight.to(wide), self.eps).to(x.dtype)
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate-half RoPE (the Llama/Qwen convention: pairs are (i, i + head_dim/2)).
    x: (B, heads, T, head_dim); cos, sin: (T, head_dim)."""
    return x * cos + rotate_half(x) * sin


def rope_table(head_dim: int, n_positions: int, theta: float):
    """cos and sin of shape (n_positions, head_dim) for positions 0..n_positions-1, computed in
    float64 (the model's dtype casts them, like every other buffer)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float64), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)  # (n_positions, head_dim)
    return angles.cos(), angles.sin()


def offset_causal_mask(n_past: int, n_new: int, device=None, pad=None):
    """Boolean mask (n_new, n_past + n_new), True = may attend.

    New token i sits at absolute position n_past + i; it sees every cached position and the new
    tokens up to itself: key j is visible iff j <= n_past + i. With n_past = 0 this is the usual
    lower-triangular causal mask; with n_new = 1 it is all True (one decode step sees everything).

    pad (B,) long: batched rows of different lengths, left-padded; row b also hides its first
    pad[b] keys, so the mask is (B, 1, n_new, n_past + n_new). RoPE scores depend only on relative
    positions, so the shift changes nothing else. A padding query still sees itself (a row of all
    -inf would give NaN); its output is never read."""
    query_pos = torch.arange(n_past, n_past + n_new, device=device)[:, None]
    key_pos = torch.arange(n_past + n_new, device=device)[None, :]
    visible = key_pos <= query_pos
    if pad is not None:
        visible = visible & ((key_pos >= pad.view(-1, 1, 1, 1)) | (key_pos == query_pos))
    return visible


def tree_layout(parents: list, device=None):
    """A token tree verified in one pass: new token 0 is the root, token i+1 is node i whose parent
    is token parents[i] + 1 (parents[i] = -1: the root). Each new token sits at position n_past +
    its depth and sees the cache and its own root-to-node path (ancestors and itself), so its
    output equals that of an ordinary causal pass over the path alone. Returns (depth (T,) long,
    sees (T, T) bool), T = len(parents) + 1."""
    T = len(parents) + 1
    depth = [0] * T
    sees = torch.eye(T, dtype=torch.bool)
    for i, parent in enumerate(parents):  # parents come before their children
        depth[i + 1] = depth[parent + 1] + 1
        sees[i + 1] |= sees[parent + 1]
    return torch.tensor(depth, device=device), sees.to(device)


class Attention(nn.Module):
    """Qwen3 attention: q/k/v/o without bias, GQA, per-head RMSNorm on q and k before RoPE
    (identity when config.qk_norm is false: the Llama-family block)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        c = config
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)
        # Qwen3 normalises each head's q and k; Llama-family blocks do not (no weights at all)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else nn.Identity()

    def project(self, x, cos, sin):
        """Hidden states (B, T, n_embd) -> rotated q (B, n_head, T, head_dim), rotated k and plain v
        (B, n_kv_head, T, head_dim). This is the seam the diffusion view substitutes."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        q = self.q_norm(q).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = self.k_norm(k).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, mask=None):
        """AR attention over T new tokens. Without a cache: plain causal self-attention. With a cache
        holding n_past positions: write the new K/V at [n_past, n_past + T) and attend to all
        n_past + T keys through `mask`, the offset causal mask (None when T == 1: a single new
        token sees everything)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)  # (B, n_kv_head, n_past + T, head_dim), views
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=cache is None and mask is None,
                                           enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, n_head * head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return self.feed_forward(x)

    def feed_forward(self, x):
        """The MLP half of the block (shared by both Orthrus views)."""
        return x + self.mlp(self.post_attention_layernorm(x))


# ---------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # RoPE for every position, built once, not saved; it follows the model's .to(dtype) like the weights
        cos, sin = rope_table(config.head_dim, config.context_len, config.rope_theta)
        self.register_buffer("rope_cos", cos.to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("rope_sin", sin.to(torch.get_default_dtype()), persistent=False)
        for module in self.modules():  # GPT-2 / nanoGPT init
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, p in self.named_parameters():  # scaled where a layer writes into the residual stream
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _apply(self, fn, recurse=True):
        """.to() / .double() / .cuda() also rebuild the RoPE table from float64, so a float64 model's
        table is exact (casting float32 values up would not make it so)."""
        super()._apply(fn, recurse)
        cos, sin = rope_table(self.config.head_dim, self.config.context_len, self.config.rope_theta)
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos), sin.to(self.rope_sin)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def new_cache(self, batch_size: int = 1, capacity: int | None = None) -> KVCache:
        """A KV cache for `capacity` positions (default: the whole context), on the model's device
        and in its dtype."""
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, capacity or self.config.context_len, device=p.device, dtype=p.dtype)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, *, logits: str = "all", pad=None, tree=None):
        """idx: (B, T) token ids at positions [n_past, n_past + T), n_past = cache.length (0 without
        a cache). With a cache, their K/V are appended and cache.length advances by T.
        pad: (B,) left-padding per row, for batches of prompts of different lengths (offset_causal_mask).
        tree: (depth, sees) from tree_layout: the T tokens are a token tree, not a sequence (token i
        at position n_past + depth[i], attending to the cache and to the tokens sees[i] marks).

        logits: "all" -> (B, T, vocab) for every position (training, verification);
                "last" -> (B, 1, vocab) for the last position only (prefill before decoding).
        """
        if logits not in ("all", "last"):
            raise ValueError(f"logits must be 'all' or 'last', got {logits!r}")
        B, T = idx.shape
        n_past = 0 if cache is None else cache.length
        x = self.embed_tokens(idx)  # (B, T, n_embd)
        cos, sin = self.rope_cos[n_past : n_past + T], self.rope_sin[n_past : n_past + T]  # (T, head_dim)
        mask = offset_causal_mask(n_past, T, idx.device, pad) if pad is not None or (cache and T > 1) else None
        if tree is not None:
            depth, sees = tree
            cos, sin = self.rope_cos[n_past + depth], self.rope_sin[n_past + depth]  # (T, head_dim)
            mask = torch.cat([sees.new_ones(T, n_past), sees], dim=1)  # (T, n_past + T)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.length += T  # the one place the cache advances
        if logits == "last":
            x = x[:, -1:, :]
        return self.lm_head(self.norm(x))

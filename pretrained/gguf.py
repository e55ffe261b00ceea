"""
GGUF files (llama.cpp): general.architecture "llama" or "qwen3", any quantization the `gguf`
package dequantizes. llama.cpp's converter permutes the rows of attn_q/attn_k of LLAMA-architecture
models into its interleaved rotary layout (convert_hf_to_gguf.py, LlamaModel.permute: rows (head,
2, head_dim/2) -> (head, head_dim/2, 2)); `unpermute_qk` undoes it (n_head for q, n_kv_head for k).
Qwen3 GGUFs keep the Hugging Face layout (llama.cpp runs Qwen with rotate-half RoPE). Tied output
when output.weight is absent.
"""

import math
import re
from collections import Counter

import torch

from errors import UserError
from model import GPTConfig
from pretrained import loading
from pretrained.bpe import BPETokenizer, gguf_fields, open_gguf
from pretrained.loading import Filler, context_len_of, empty_models, gpt_config

# GGUF tensor names -> ours ({i} = layer)
GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}
_GGUF_RE = {re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"): v for k, v in GGUF_NAMES.items()}


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter layout for a LLAMA-architecture attn_q/attn_k (rows of each head go
    from rotate-half pairs (i, i + d/2) to interleaved pairs (2i, 2i + 1)). For tests and checks."""
    out, dim = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, dim).transpose(1, 2).reshape(out, dim)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_qk`: a LLAMA GGUF's attn_q/attn_k rows back to the Hugging Face layout."""
    out, dim = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, dim).transpose(1, 2).reshape(out, dim)


def gguf_config(fields: dict, tensor_shapes: dict, where: str, context_len=None) -> GPTConfig:
    """GGUF metadata -> GPTConfig (architecture llama or qwen3), or a one-line refusal."""
    arch = fields.get("general.architecture")
    if arch not in ("llama", "qwen3"):
        raise UserError(f"{where}: GGUF architecture {arch!r} is not supported (only llama and qwen3)")

    def get(key, default=None):
        v = fields.get(f"{arch}.{key}", default)
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise UserError(f"{where}: per-layer {key} values {sorted(set(v))[:4]} are not supported")
            v = v[0]
        return v

    scaling = get("rope.scaling.type")
    if (scaling not in (None, "none") or "rope_freqs.weight" in tensor_shapes
            or (get("rope.scaling.factor") not in (None, 1.0))):
        raise UserError(f"{where}: rope scaling ({scaling or 'rope_freqs'}) is not supported; only plain RoPE")
    if get("attention.sliding_window"):
        raise UserError(f"{where}: sliding-window attention is not supported")
    try:
        n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
        head_dim = int(get("attention.key_length") or n_embd // max(1, n_head))  # (0 heads: refused by name below)
        if int(get("attention.value_length") or head_dim) != head_dim:
            raise UserError(f"{where}: key and value head sizes differ; not supported")
        if int(get("rope.dimension_count") or head_dim) != head_dim:
            raise UserError(f"{where}: RoPE over part of the head (rope.dimension_count "
                            f"{get('rope.dimension_count')} < {head_dim}) is not supported")
        if "token_embd.weight" not in tensor_shapes:
            raise UserError(f"{where}: no token_embd.weight tensor")
        vocab = int(tensor_shapes["token_embd.weight"][-1])  # GGUF shapes are (n_embd, vocab): reversed
        values = dict(
            vocab_size=vocab, n_layer=int(get("block_count")), n_embd=n_embd, n_head=n_head,
            n_kv_head=int(get("attention.head_count_kv") or n_head), head_dim=head_dim,
            mlp_hidden=int(get("feed_forward_length")), rope_theta=float(get("rope.freq_base", 10000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in tensor_shapes, qk_norm=arch == "qwen3",
            context_len=context_len_of(int(get("context_length", 2048)), context_len, where))
    except TypeError:
        missing = [k for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
                   if get(k) is None]
        raise UserError(f"{where}: GGUF metadata lacks {arch}.{missing[0] if missing else '?'}") from None
    keys = {"vocab_size": "token_embd.weight's rows", "context_len": "context_length", "n_layer": "block_count",
            "n_embd": "embedding_length", "n_head": "attention.head_count", "n_kv_head": "attention.head_count_kv",
            "head_dim": "attention.key_length", "mlp_hidden": "feed_forward_length", "rope_theta": "rope.freq_base",
            "rms_norm_eps": "attention.layer_norm_rms_epsilon"}
    return gpt_config(values, {f: k if f == "vocab_size" else f"{arch}.{k}" for f, k in keys.items()},
                      f"{where}: GGUF metadata")


def load_gguf(path, device, dtype, context_len, mask_id):
    import gguf  # optional package: only needed for .gguf files

    reader = open_gguf(path)
    fields = gguf_fields(reader)
    shapes = {t.name: [int(x) for x in t.shape] for t in reader.tensors}
    config = gguf_config(fields, shapes, path, context_len)
    readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F64,
                *gguf.quants._type_traits}
    for t in reader.tensors:
        if t.tensor_type not in readable:
            raise UserError(f"{path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package cannot "
                            f"dequantize; re-quantize the model (e.g. llama-quantize ... Q8_0) or use F16")
    tok = BPETokenizer.from_gguf_fields(fields, path=path, vocab_size=config.vocab_size, mask_id=mask_id)
    arch = fields["general.architecture"]
    stop = [fields.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")] + [tok.eot_id]
    stop = [int(i) for i in dict.fromkeys(i for i in stop if i is not None)]
    del fields
    reader.fields.clear()  # the metadata's Python objects (~150 MB for a 49k vocabulary) go before the weights come
    base, _ = empty_models(config, device, dtype)
    fill = Filler(dict(base.named_parameters()), path)
    types = Counter()
    for t in reader.tensors:
        name = None
        for pattern, ours in _GGUF_RE.items():
            m = pattern.match(t.name)
            if m:
                name = ours.replace("{i}", m.group(1)) if m.groups() else ours
                break
        if name is None:
            raise UserError(f"{path}: unexpected tensor {t.name}; not a supported {arch} model")
        types[t.tensor_type.name] += 1
        shape = tuple(reversed(shapes[t.name]))  # GGUF lists dimensions innermost first
        heads = {"q_proj": config.n_head, "k_proj": config.n_kv_head}.get(name.split(".")[-2]) if arch == "llama" else None
        if heads is not None:  # llama.cpp's rotary row order -> Hugging Face's (whole tensor: rows move)
            fill(name, unpermute_qk(_gguf_rows(t, 0, shape[0]).reshape(shape), heads), t.name)
        else:  # row chunks of about 4M values: the float32 copy of a big matrix never exists whole
            step = max(1, loading.CHUNK_VALUES // max(1, math.prod(shape[1:])))
            fill.in_chunks(name, shape, ((a, _gguf_rows(t, a, min(a + step, shape[0])).reshape(-1, *shape[1:]))
                                         for a in range(0, shape[0], step)), t.name)
    fill.check_complete()
    info = {"format": "gguf", "architecture": arch, "source_dtypes": dict(types), "stop_ids": stop,
            "context_len_source": f"{arch}.context_length" if context_len is None else "context_len argument",
            "notes": [f"{arch} attn_q/attn_k un-permuted from llama.cpp's layout"] if arch == "llama" else []}
    return base, None, tok, info


def _gguf_rows(t, start, end) -> torch.Tensor:
    """Rows [start, end) of a GGUF tensor (outermost dimension), dequantized to float32."""
    import gguf
    import numpy as np

    data = t.data[start:end]  # numpy order: (rows, ...) for float types, (rows, bytes) for quantized ones
    if t.tensor_type == gguf.GGMLQuantizationType.F64:
        w = np.asarray(data).view(np.float64)
    else:
        w = gguf.quants.dequantize(data, t.tensor_type)
    w = np.asarray(w, dtype=np.float32)
    return torch.from_numpy(w if w.flags.writeable else w.copy())

"""
Hugging Face model folders: config.json model_type "qwen3" (q/k RMSNorm) or "llama" (no q/k
norm); refused: other types, rope scaling, attention/MLP biases, sliding-window attention,
activations other than SiLU. Weights: model.safetensors or a sharded model.safetensors.index.json.
A tied model ignores a stored lm_head.weight. Stop ids: generation_config.json's eos_token_id,
else config.json's. context_len = max_position_embeddings unless lowered (it sizes the RoPE table).
An official Orthrus folder is a Qwen3 folder with a head (pretrained/official.py).
"""

import math
import os
import re
from collections import Counter

from diffusion_head import DRAFT_LEN, check_draft_lens
from errors import UserError, first_line
from model import GPTConfig
from pretrained import loading
from pretrained.bpe import BPETokenizer
from pretrained.loading import Filler, context_len_of, empty_models, gpt_config, read_json
from pretrained.official import OFFICIAL_DIFF, finish_official_head


def read_hf_config(folder) -> dict:
    """A model folder's config.json, a file holding a JSON object: where a folder that is no
    Hugging Face model is refused (our checkpoints are files, never folders)."""
    path = os.path.join(folder, "config.json")
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder, not a file: {folder} is not a Hugging Face model folder")
    if not os.path.isfile(path):
        pts = sorted(f for f in os.listdir(folder) if f.endswith(".pt"))
        hint = (f"; to open an orthrus checkpoint, pass the .pt file inside it ({os.path.join(folder, pts[0])})" if pts
                else " (pass a Hugging Face model folder, a .gguf file or an orthrus .pt checkpoint)")
        raise UserError(f"{folder} is a folder with no config.json: not a Hugging Face model folder{hint}")
    return read_json(path)


# GPTConfig field -> its config.json key, for refusals
HF_KEYS = {"vocab_size": "vocab_size", "context_len": "max_position_embeddings", "n_layer": "num_hidden_layers",
           "n_embd": "hidden_size", "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads",
           "head_dim": "head_dim", "mlp_hidden": "intermediate_size", "rope_theta": "rope_theta",
           "rms_norm_eps": "rms_norm_eps"}


def hf_config_to_gpt(cfg: dict, where: str, context_len=None) -> GPTConfig:
    """config.json -> GPTConfig, or a one-line refusal of what this model cannot run."""
    mt = cfg.get("model_type")
    if mt not in ("qwen3", "llama"):
        raise UserError(f"{where}: model_type {mt!r} is not supported (only qwen3 and llama: the Qwen3 block and the "
                        f"Llama-family block)")
    rope = cfg.get("rope_parameters") or {}
    if cfg.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise UserError(f"{where}: rope scaling ({cfg.get('rope_scaling') or rope.get('rope_type')}) is not supported; "
                        f"only plain RoPE (rope_scaling null)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UserError(f"{where}: attention/MLP biases are not supported (attention_bias and mlp_bias must be false)")
    if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or []):
        raise UserError(f"{where}: sliding-window attention is not supported (use_sliding_window must be false)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {cfg.get('hidden_act')!r} is not supported (only silu, SwiGLU)")
    try:
        n_head = int(cfg["num_attention_heads"])
        max_pos = int(cfg.get("max_position_embeddings", 32768 if mt == "qwen3" else 2048))
        # transformers' defaults where a key is missing (Qwen3Config: head_dim 128; Llama: n_embd / n_head)
        # (0 heads is refused by name below)
        head_dim = cfg.get("head_dim") or (128 if mt == "qwen3" else int(cfg["hidden_size"]) // max(1, n_head))
        values = dict(
            vocab_size=int(cfg["vocab_size"]), n_layer=int(cfg["num_hidden_layers"]), n_embd=int(cfg["hidden_size"]),
            n_head=n_head, n_kv_head=int(cfg.get("num_key_value_heads") or n_head), head_dim=int(head_dim),
            mlp_hidden=int(cfg["intermediate_size"]),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qk_norm=mt == "qwen3",
            context_len=context_len_of(max_pos, context_len, where))
    except KeyError as e:
        raise UserError(f"{where}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: config.json has a malformed value ({e})") from None
    return gpt_config(values, HF_KEYS, f"{where}: config.json")


def _weight_files(folder):
    """The safetensors files of a folder, in order, with the index's tensor names (or None)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index} has no weight_map; the index is damaged")
        files = sorted(set(weight_map.values()))
        for f in files:
            if not os.path.isfile(os.path.join(folder, f)):
                raise UserError(f"shard {f} listed in {index} is missing; download it into {folder}")
        return [os.path.join(folder, f) for f in files], weight_map
    if os.path.isfile(single):
        return [single], None
    if any(f.endswith(".bin") for f in os.listdir(folder)):
        raise UserError(f"{folder} has PyTorch .bin weights; only safetensors are supported (model.safetensors or "
                        f"model.safetensors.index.json): download the safetensors version")
    raise UserError(f"{folder} has no weights: expected model.safetensors or model.safetensors.index.json")


def _iter_safetensors(files, weight_map, where):
    """(name, safetensors slice) for every tensor of every file, one at a time; read the slice
    (`_put`) while the next one is not yet asked for (its file is open until then)."""
    from safetensors import safe_open  # optional package: only needed for Hugging Face folders

    seen = set()
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if weight_map is not None and name not in weight_map:
                        raise UserError(f"{where}: tensor {name} in {os.path.basename(path)} is not listed in "
                                        "model.safetensors.index.json; the index is damaged or from another download")
                    if weight_map is not None and weight_map[name] != os.path.basename(path):
                        raise UserError(f"{where}: tensor {name} is in {os.path.basename(path)} but the index says "
                                        f"{weight_map[name]}; the index is damaged")
                    seen.add(name)
                    yield name, f.get_slice(name)
        except UserError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise UserError(f"cannot read {path}: {type(e).__name__}: {first_line(e, 120)}") from None
    if weight_map is not None and set(weight_map) - seen:
        missing = sorted(set(weight_map) - seen)
        raise UserError(f"{where}: {len(missing)} tensor(s) listed in the index are not in their shard, e.g. {missing[0]}")


def _put(fill, name, sl, source_name):
    """Copy a safetensors slice into a parameter, in row chunks of about loading.CHUNK_VALUES values (a
    big bf16 matrix is never converted whole)."""
    shape = tuple(sl.get_shape())
    if len(shape) < 2 or math.prod(shape) <= loading.CHUNK_VALUES:
        return fill(name, sl[:], source_name)
    step = max(1, loading.CHUNK_VALUES // math.prod(shape[1:]))
    fill.in_chunks(name, shape, ((a, sl[a:a + step]) for a in range(0, shape[0], step)), source_name)


def load_hf_folder(folder, device, dtype, context_len, mask_id):
    cfg = read_hf_config(folder)
    config = hf_config_to_gpt(cfg, folder, context_len)
    files, weight_map = _weight_files(folder)  # before the slow tokenizer: fail fast on missing weights
    official = "block_size" in cfg or "mask_token_id" in cfg
    notes = []
    if official:
        if cfg.get("model_type") != "qwen3":
            raise UserError(f"{folder}: an official Orthrus folder must be Qwen3, got model_type {cfg.get('model_type')!r}")
        block_size, official_mask = cfg.get("block_size"), cfg.get("mask_token_id")
        if not isinstance(official_mask, int) or not 0 <= official_mask < config.vocab_size:
            raise UserError(f"{folder}: config.json needs a mask_token_id in 0..{config.vocab_size - 1} (official "
                            f"Orthrus format), got {official_mask!r}")
        check_draft_lens([block_size], f"{folder}: config.json's block_size")
        if mask_id is not None and mask_id != official_mask:
            raise UserError(f"mask_id {mask_id} differs from the folder's mask_token_id {official_mask}; leave mask_id unset")
        mask_id = official_mask
        lens = cfg.get("orthrus_trained_draft_lens") or [block_size]
        if not isinstance(lens, list):
            raise UserError(f"{folder}: orthrus_trained_draft_lens must be a list, got {lens!r}")
        check_draft_lens(lens, f"{folder}: each of orthrus_trained_draft_lens")
        for name, K in (("block_size", block_size), ("orthrus_trained_draft_lens", max(lens))):
            if K > config.context_len:  # a block of K positions must fit the context it is drafted in
                raise UserError(f"{folder}: config.json's {name} {K} exceeds the model's context of "
                                f"{config.context_len} positions; a block size must be in 2..{config.context_len}")
    tok = BPETokenizer.from_hf_folder(folder, vocab_size=config.vocab_size, mask_id=mask_id)

    base, head = empty_models(config, device, dtype, head_mask_id=tok.mask_id if official else None,
                              draft_lens=lens if official else (DRAFT_LEN,))
    base_params = dict(base.named_parameters())  # a tied lm_head is the embedding: listed once
    fill = Filler(base_params, folder)
    head_fill = Filler({f"model.layers.{i}.self_attn.{n}_diff.weight": getattr(head.attn[i], n).weight
                         for i in range(config.n_layer) for n in OFFICIAL_DIFF}, folder) if official else None
    diff_re = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj|q_norm|k_norm)_diff\.weight$")
    types = Counter()
    for name, t in _iter_safetensors(files, weight_map, folder):
        types[t.get_dtype()] += 1
        m = diff_re.match(name)
        if m:
            if head_fill is None:
                raise UserError(f"{folder}: weights hold Orthrus head tensors ({name}) but config.json lacks block_size "
                                f"and mask_token_id; add them (official Orthrus format)")
            _put(head_fill, name, t, name)
        elif name == "lm_head.weight":
            if config.tie_embeddings:
                notes.append("tied model: the stored lm_head.weight was ignored")
            else:
                _put(fill, "lm_head.weight", t, name)
        elif name.startswith("model.") and not name.endswith("rotary_emb.inv_freq"):
            _put(fill, name[len("model."):], t, name)
        elif not name.endswith("rotary_emb.inv_freq"):
            _put(fill, name, t, name)  # raises: unexpected tensor
    fill.check_complete()
    info = {"format": "hf", "architecture": cfg["model_type"], "source_dtypes": dict(types),
            "context_len_source": "max_position_embeddings" if context_len is None else "context_len argument",
            "stop_ids": _hf_stop_ids(folder, cfg, tok), "notes": notes}
    if official:
        head_fill.check_complete("Orthrus head weights")
        finish_official_head(folder, cfg, base, head)
        info.update(format="official", block_size=cfg["block_size"], head_config=head.head_config())
    return base, head, tok, info


def _hf_stop_ids(folder, cfg, tok):
    gen = read_json(os.path.join(folder, "generation_config.json")) or {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    ids = [*ids, tok.special_ids.get("eos"), tok.eot_id]  # end of text always ends generation
    return [int(i) for i in dict.fromkeys(ids) if i is not None]

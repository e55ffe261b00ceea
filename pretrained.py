"""
Real pretrained models for orthrus: Hugging Face folders (Qwen3, Llama family), GGUF files
(llama.cpp; Llama family and Qwen3, any quantization the `gguf` package dequantizes) and the
official Orthrus checkpoint format, read and written. The rest of the code only ever sees a
`model.GPT`, an optional `diffusion_head.DiffusionHead` and a tokenizer (tokenizer.BPETokenizer).

    base, head, tok, info = load_pretrained("path/to/Qwen3-0.6B")        # HF folder
    base, head, tok, info = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids, end_of_turn = chat_prompt(tok, "Write a haiku.")                  # ChatML prompt ids
    export_official(base, head, "out/orthrus-folder", tokenizer=tok, source=path)

Loading, with about one copy of the weights in memory (plus, for a file stored in another dtype,
the pages of the memory-mapped file being read: a bf16 folder loaded in fp32 peaked at 1.6x the
fp32 weights): the GPT is built on the `meta` device
(no random init), given uninitialised storage in the target dtype/device, and every tensor is
read from the file one at a time (safetensors `safe_open`; GGUF through a memory map, dequantized
to float32 per tensor) and copied into place. Every parameter must be filled exactly once and
every tensor in the file must be used (a one-line UserError names the first offender).

Hugging Face folders: config.json model_type "qwen3" (q/k RMSNorm) or "llama" (no q/k norm);
refused: other types, rope scaling, attention/MLP biases, sliding-window attention, activations
other than SiLU. Weights: model.safetensors or a sharded model.safetensors.index.json. A tied
model (tie_word_embeddings) ignores a stored lm_head.weight. Stop ids: generation_config.json's
eos_token_id (an int or a list), else config.json's. context_len = max_position_embeddings
(40960 for Qwen3) unless load_pretrained(context_len=...) lowers it: it sizes the RoPE table; the
decoders size their KV cache to the job.

GGUF: general.architecture "llama" or "qwen3". llama.cpp's converter permutes the rows of
attn_q/attn_k of LLAMA-architecture models into its interleaved rotary layout
(convert_hf_to_gguf.py, LlamaModel.permute: rows (head, 2, head_dim/2) -> (head, head_dim/2, 2));
`unpermute_qk` undoes it (n_head for q, n_kv_head for k). Qwen3 GGUFs are not permuted (its
converter class derives from the Qwen2 one, which keeps the Hugging Face layout: llama.cpp runs
Qwen with NEOX, i.e. rotate-half, RoPE). Tied output when output.weight is absent.

MASK id (the head's MASK marker; the head owns its trainable MASK embedding, so the base's row is
never changed): the first padded embedding row when the model has one (Qwen3: 151669 =
len(tokenizer), the official Orthrus choice; vocab_size 151936), else an added token that text
never produces and the chat format never uses (SmolLM2, exactly 49152 rows: id 16
"<empty_output>", whose embedding row is identical to those of the other never-trained markers
ids 7-16). load_pretrained(mask_id=...) overrides it.

Official Orthrus format (both ways). An official folder is a Qwen3 folder whose config.json adds
`block_size` and `mask_token_id` and whose weights add, per layer i,
model.layers.{i}.self_attn.{q,k,v,o}_proj_diff.weight and self_attn.{q,k}_norm_diff.weight: the
head's attention (head.attn[i]). The official code reads MASK through the embedding table, so on
load the head's mask_embedding = embed_tokens row mask_token_id, and trained_draft_lens =
[block_size].

Export (`export_official`) must put our trained MASK embedding where the official code reads it,
row mask_token_id of embed_tokens, WITHOUT changing what the AR view computes. Our decision:
  - the MASK row equals the base's row (an untrained head): written unchanged, tied stays tied;
  - tied base (small Qwen3): the export is UNTIED: lm_head.weight = the base's original matrix,
    embed_tokens.weight = the same matrix with row mask_token_id replaced, tie_word_embeddings
    false, and `orthrus_base_tied: true` so our loader re-ties it (bit-identical base). Writing
    the row into a tied table would also change that row of the LM head: its logit enters every
    softmax, so the AR distribution would change even though the id is never in the text (a padded
    row is still a logit; with the default greedy/top-k it rarely matters, but it is not exact).
    Cost: one more vocab x n_embd matrix on disk and in the official loader's memory;
  - untied base: row mask_token_id of embed_tokens is replaced; the base's original row goes to a
    side file, orthrus_base_rows.safetensors (not in the index, ignored by transformers), which
    our loader puts back.
Guarantee: for every input sequence that does not contain mask_token_id, the exported AR view
(official code or ours) gives bit-identical logits to the base; MASK reads our embedding. The only
divergence: if the AR view is ever fed mask_token_id itself (the model would have to emit that
padded/unused id first), it sees our MASK embedding instead of the base's row. Our own round trip
export -> load_pretrained is bit-identical for base and head tensors and head_config
(`orthrus_trained_draft_lens` keeps the list). Llama-family bases are refused (the official format
is Qwen3).

Errors: every bad input (missing files, unsupported architecture or quantization, a tokenizer
that is not byte-level BPE, a base that differs from the expected one) is a one-line
errors.UserError saying what was wrong and how to fix it.
"""

import dataclasses
import json
import math
import os
import re
import shutil
import time
from collections import Counter

import torch

from errors import UserError, first_line
from model import GPT, GPTConfig

OFFICIAL_DIFF = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")  # head.attn[i].<name>
BASE_ROWS_FILE = "orthrus_base_rows.safetensors"
CHUNK_VALUES = 1 << 22  # big tensors are read and converted in row chunks of about this many values
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
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


# ---------------------------------------------------------------------------------------------
# Entry points


def is_pretrained_path(path) -> bool:
    """A model folder (holding config.json) or a .gguf file: what load_pretrained reads."""
    path = os.fspath(path)
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))) or (
        path.endswith(".gguf") and os.path.isfile(path))


def load_pretrained(path, device="cpu", dtype=torch.float32, *, context_len=None, mask_id=None,
                    expect_base_sha256=None):
    """(base GPT, DiffusionHead or None, tokenizer, info) from a Hugging Face / official Orthrus
    folder or a .gguf file; models in eval mode with requires_grad False.

    context_len: lower the model's context (default: its max_position_embeddings / context_length).
    mask_id: the MASK id to use instead of the default choice (see the module docstring).
    expect_base_sha256: refuse a base whose common.state_sha256 (in the loaded dtype) differs, e.g.
    an official head folder built on another base than the one the head was meant for.
    info: format, architecture, config, stop_ids (end of generation), end_of_turn_id, chat,
    mask_id and why, tied, source tensor types, parameter counts, notes, load seconds."""
    t0 = time.perf_counter()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"no such model file or folder: {path}")
    device, dtype = torch.device(device), _as_dtype(dtype)
    if os.path.isdir(path):
        base, head, tok, info = _load_hf_folder(path, device, dtype, context_len, mask_id)
    elif path.endswith(".gguf"):
        base, head, tok, info = _load_gguf(path, device, dtype, context_len, mask_id)
    else:
        raise UserError(f"{path} is neither a model folder (with config.json) nor a .gguf file")
    base.requires_grad_(False).eval()
    if head is not None:
        head.requires_grad_(False).eval()
    if expect_base_sha256 is not None:
        from common import state_sha256

        got = state_sha256(base.state_dict())
        info["base_sha256"] = got
        if got != expect_base_sha256:
            raise UserError(f"the base weights in {path} are not the expected base (sha256 {got[:12]}... instead of "
                            f"{expect_base_sha256[:12]}...); use the folder built on that base, or the base it was made for")
    info.update(path=path, dtype=str(dtype).replace("torch.", ""), n_params=base.num_params(),
                head_params=sum(p.numel() for p in head.parameters()) if head is not None else 0,
                mask_id=tok.mask_id, mask_choice=tok.mask_choice, chat=tok.chat_format is not None,
                end_of_turn_id=tok.end_of_turn_id, tied=base.config.tie_embeddings,
                config=dataclasses.asdict(base.config), seconds=time.perf_counter() - t0)
    return base, head, tok, info


def read_config(path) -> GPTConfig:
    """The GPTConfig of a model folder or .gguf file, without reading the weights (train.py --dry-run)."""
    from tokenizer import gguf_fields, open_gguf

    path = os.fspath(path)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise UserError(f"{path} has no config.json: not a Hugging Face model folder (or pass a .gguf file)")
        return hf_config_to_gpt(_read_json(cfg_path), path)
    reader = open_gguf(path)
    return gguf_config(gguf_fields(reader), {t.name: [int(x) for x in t.shape] for t in reader.tensors}, path)


def load_model_tokenizer(path):
    """The tokenizer load_pretrained(path) returns (the model's vocabulary size and MASK id
    included), without reading the weights: for tokenizing data with a model's own tokenizer."""
    from tokenizer import BPETokenizer, gguf_fields, open_gguf

    path = os.fspath(path)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise UserError(f"{path} has no config.json: not a Hugging Face model folder (or pass a .gguf file)")
        cfg = _read_json(cfg_path)
        config = hf_config_to_gpt(cfg, path)
        return BPETokenizer.from_hf_folder(path, vocab_size=config.vocab_size, mask_id=cfg.get("mask_token_id"))
    if not (path.endswith(".gguf") and os.path.isfile(path)):
        raise UserError(f"{path} is neither a model folder (with config.json) nor a .gguf file")
    reader = open_gguf(path)
    fields = gguf_fields(reader)
    config = gguf_config(fields, {t.name: [int(x) for x in t.shape] for t in reader.tensors}, path)
    return BPETokenizer.from_gguf_fields(fields, path=path, vocab_size=config.vocab_size)


def chat_prompt(tokenizer, prompt: str, system=None):
    """(ids, end_of_turn_id): the prompt as one user turn in the model's chat format, ending where
    the assistant's reply starts (Qwen3 ChatML with thinking off; SmolLM2 ChatML with its default
    system prompt). Stop generation at end_of_turn_id (<|im_end|>) and at info["stop_ids"]."""
    if getattr(tokenizer, "chat_format", None) is None:
        raise UserError("this model has no chat format this code knows (ChatML with <|im_start|>/<|im_end|>); "
                        "drop --chat and give a plain prompt")
    return tokenizer.encode_chat(prompt, system=system), tokenizer.end_of_turn_id


# ---------------------------------------------------------------------------------------------
# Building an empty model and filling it tensor by tensor


def _as_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise UserError(f"unknown dtype {dtype!r}: use float32, bfloat16, float16 or float64")
    return names[dtype]


def empty_models(config: GPTConfig, device, dtype, head_mask_id=None, trained_draft_lens=(16,)):
    """A GPT (and a DiffusionHead when head_mask_id is given) with uninitialised storage: built on
    the meta device, so no random init and no second copy; the caller fills every parameter.
    Non-persistent buffers (the RoPE table) are recomputed for real."""
    import model as model_module

    with torch.device("meta"):
        base = GPT(config)
        head = None
        if head_mask_id is not None:
            from diffusion_head import DiffusionHead

            head = DiffusionHead(base, head_mask_id, trained_draft_lens)
    base = base.to(dtype=dtype).to_empty(device=device)
    if config.tie_embeddings:  # to_empty gives each module its own new tensor: tie again
        base.lm_head.weight = base.embed_tokens.weight
    buffers = {name for name, _ in base.named_buffers()}
    if buffers:
        if buffers != {"rope_cos", "rope_sin"}:
            raise RuntimeError(f"pretrained.empty_models does not know how to rebuild GPT buffers {sorted(buffers)}")
        cos, sin = model_module.rope_table(config.head_dim, config.context_len, config.rope_theta)
        with torch.no_grad():
            base.rope_cos.copy_(cos)
            base.rope_sin.copy_(sin)
    if head is not None:
        head = head.to(dtype=dtype).to_empty(device=device)
    return base, head


class _Filler:
    """Copies named tensors into parameters, each exactly once, with one-line errors."""

    def __init__(self, params: dict, where: str):
        self.params, self.where, self.filled = params, where, set()

    def __call__(self, name, tensor, source_name=None):
        p = self.params.get(name)
        if p is None:
            raise UserError(f"{self.where}: unexpected tensor {source_name or name} (shape {tuple(tensor.shape)}); "
                            f"this is not a supported Qwen3/Llama causal LM checkpoint")
        if tuple(tensor.shape) != tuple(p.shape):
            raise UserError(f"{self.where}: tensor {source_name or name} has shape {tuple(tensor.shape)} but the config "
                            f"implies {tuple(p.shape)}; config and weights do not belong together")
        if name in self.filled:
            raise UserError(f"{self.where}: tensor {source_name or name} appears twice")
        with torch.no_grad():
            p.copy_(tensor)
        self.filled.add(name)

    def in_chunks(self, name, shape, chunks, source_name=None):
        """Fill a parameter of `shape` from (first row, rows) pieces covering it in order."""
        p = self.params.get(name)
        if p is None or tuple(shape) != tuple(p.shape) or name in self.filled:
            return self(name, torch.empty(shape, device="meta"), source_name)  # the same one-line errors
        done = 0
        with torch.no_grad():
            for start, rows in chunks:
                assert start == done, "chunks must cover the tensor in order"
                p[start:start + rows.shape[0]].copy_(rows)
                done += rows.shape[0]
        assert done == shape[0], f"{name}: {done} of {shape[0]} rows filled"
        self.filled.add(name)

    def check_complete(self, what="weights"):
        missing = sorted(set(self.params) - self.filled)
        if missing:
            raise UserError(f"{self.where}: the {what} lack {len(missing)} tensor(s), e.g. {missing[0]}; "
                            f"the checkpoint is incomplete or for another architecture")


# ---------------------------------------------------------------------------------------------
# Hugging Face folders (plain and official Orthrus)


def _read_json(path, required=False):
    if not os.path.isfile(path):
        if required:
            raise UserError(f"{path} not found")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({first_line(e, 100)})") from None


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
        head_dim = cfg.get("head_dim") or (128 if mt == "qwen3" else int(cfg["hidden_size"]) // n_head)
        values = dict(
            vocab_size=int(cfg["vocab_size"]), n_layer=int(cfg["num_hidden_layers"]), n_embd=int(cfg["hidden_size"]),
            n_head=n_head, n_kv_head=int(cfg.get("num_key_value_heads") or n_head), head_dim=int(head_dim),
            mlp_hidden=int(cfg["intermediate_size"]),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), qk_norm=mt == "qwen3",
            context_len=_context_len(max_pos, context_len, where))
    except KeyError as e:
        raise UserError(f"{where}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: config.json has a malformed value ({e})") from None
    return GPTConfig(**values)


def _context_len(model_max, wanted, where):
    if wanted is None:
        return model_max
    if not isinstance(wanted, int) or not 1 <= wanted <= model_max:
        raise UserError(f"context_len must be an integer in 1..{model_max} (the context {where} was trained for), "
                        f"got {wanted!r}")
    return wanted


def _weight_files(folder):
    """The safetensors files of a folder, in order, with the index's tensor names (or None)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(index):
        data = _read_json(index)
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
    from safetensors import safe_open

    seen = set()
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if weight_map is not None and weight_map.get(name) != os.path.basename(path):
                        raise UserError(f"{where}: tensor {name} is in {os.path.basename(path)} but the index says "
                                        f"{weight_map.get(name)}; the index is damaged")
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
    """Copy a safetensors slice into a parameter, in row chunks of about CHUNK_VALUES values (a
    big bf16 matrix is never converted whole)."""
    shape = tuple(sl.get_shape())
    if len(shape) < 2 or math.prod(shape) <= CHUNK_VALUES:
        return fill(name, sl[:], source_name)
    step = max(1, CHUNK_VALUES // math.prod(shape[1:]))
    fill.in_chunks(name, shape, ((a, sl[a:a + step]) for a in range(0, shape[0], step)), source_name)


def _load_hf_folder(folder, device, dtype, context_len, mask_id):
    from tokenizer import BPETokenizer

    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"{folder} has no config.json: not a Hugging Face model folder (or pass a .gguf file)")
    cfg = _read_json(cfg_path)
    config = hf_config_to_gpt(cfg, folder, context_len)
    files, weight_map = _weight_files(folder)  # before the slow tokenizer: fail fast on missing weights
    official = "block_size" in cfg or "mask_token_id" in cfg
    notes = []
    if official:
        if cfg.get("model_type") != "qwen3":
            raise UserError(f"{folder}: an official Orthrus folder must be Qwen3, got model_type {cfg.get('model_type')!r}")
        block_size, official_mask = cfg.get("block_size"), cfg.get("mask_token_id")
        if not isinstance(block_size, int) or block_size < 2 or not isinstance(official_mask, int) \
                or not 0 <= official_mask < config.vocab_size:
            raise UserError(f"{folder}: config.json needs an integer block_size >= 2 and a mask_token_id in "
                            f"0..{config.vocab_size - 1} (official Orthrus format), got {block_size!r}, {official_mask!r}")
        if mask_id is not None and mask_id != official_mask:
            raise UserError(f"mask_id {mask_id} differs from the folder's mask_token_id {official_mask}; leave mask_id unset")
        mask_id = official_mask
        lens = cfg.get("orthrus_trained_draft_lens") or [block_size]
        if not isinstance(lens, list) or not all(isinstance(k, int) and k >= 2 for k in lens):
            raise UserError(f"{folder}: orthrus_trained_draft_lens must be a list of integers >= 2, got {lens!r}")
    tok = BPETokenizer.from_hf_folder(folder, vocab_size=config.vocab_size, mask_id=mask_id)

    base, head = empty_models(config, device, dtype, head_mask_id=tok.mask_id if official else None,
                              trained_draft_lens=lens if official else (16,))
    base_params = dict(base.named_parameters())  # a tied lm_head is the embedding: listed once
    fill = _Filler(base_params, folder)
    head_fill = _Filler({f"model.layers.{i}.self_attn.{n}_diff.weight": getattr(head.attn[i], n).weight
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
        _finish_official_head(folder, cfg, base, head)
        info.update(format="official", block_size=cfg["block_size"], head_config=head.head_config())
    return base, head, tok, info


def _finish_official_head(folder, cfg, base, head):
    """MASK embedding = embed row mask_token_id (how the official code reads MASK), then undo what
    our export did to keep the AR view exact (see the module docstring)."""
    m = head.mask_id
    E = base.embed_tokens.weight
    with torch.no_grad():
        head.mask_embedding.copy_(E[m])
        if cfg.get("orthrus_base_tied"):
            W = base.lm_head.weight
            differ = (E != W).any(dim=1)
            differ[m] = False
            if differ.any():
                raise UserError(f"{folder}: config says orthrus_base_tied but lm_head.weight and embed_tokens.weight "
                                f"differ beyond row {m}; remove orthrus_base_tied from config.json")
            E.copy_(W)
            base.lm_head.weight = base.embed_tokens.weight  # tie again; the separate copy is freed
            base.config = dataclasses.replace(base.config, tie_embeddings=True)
        rows = os.path.join(folder, BASE_ROWS_FILE)
        if os.path.isfile(rows):
            from safetensors.torch import load_file

            row = load_file(rows).get("model.embed_tokens.weight.base_row")
            if row is None or tuple(row.shape) != (base.config.n_embd,):
                raise UserError(f"{rows} lacks a model.embed_tokens.weight.base_row of {base.config.n_embd} values; "
                                f"delete the file (the base's MASK row is then the head's)")
            E[m].copy_(row)


def _hf_stop_ids(folder, cfg, tok):
    gen = _read_json(os.path.join(folder, "generation_config.json")) or {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    ids = [*ids, tok.special_ids.get("eos"), tok.eot_id]  # end of text always ends generation
    return [int(i) for i in dict.fromkeys(ids) if i is not None]


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp)


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
        head_dim = int(get("attention.key_length") or n_embd // n_head)
        if int(get("attention.value_length") or head_dim) != head_dim:
            raise UserError(f"{where}: key and value head sizes differ; not supported")
        if int(get("rope.dimension_count") or head_dim) != head_dim:
            raise UserError(f"{where}: RoPE over part of the head (rope.dimension_count "
                            f"{get('rope.dimension_count')} < {head_dim}) is not supported")
        if "token_embd.weight" not in tensor_shapes:
            raise UserError(f"{where}: no token_embd.weight tensor")
        vocab = int(tensor_shapes["token_embd.weight"][-1])  # GGUF shapes are (n_embd, vocab): reversed
        return GPTConfig(
            vocab_size=vocab, n_layer=int(get("block_count")), n_embd=n_embd, n_head=n_head,
            n_kv_head=int(get("attention.head_count_kv") or n_head), head_dim=head_dim,
            mlp_hidden=int(get("feed_forward_length")), rope_theta=float(get("rope.freq_base", 10000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in tensor_shapes, qk_norm=arch == "qwen3",
            context_len=_context_len(int(get("context_length", 2048)), context_len, where))
    except TypeError:
        missing = [k for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
                   if get(k) is None]
        raise UserError(f"{where}: GGUF metadata lacks {arch}.{missing[0] if missing else '?'}") from None


def _load_gguf(path, device, dtype, context_len, mask_id):
    import gguf

    from tokenizer import BPETokenizer, gguf_fields, open_gguf

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
    fill = _Filler(dict(base.named_parameters()), path)
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
            step = max(1, CHUNK_VALUES // max(1, math.prod(shape[1:])))
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


# ---------------------------------------------------------------------------------------------
# Export to the official Orthrus format


def export_official(base: GPT, head, out_dir, *, tokenizer=None, source=None, block_size=None, dtype=None,
                    max_shard_bytes=4 << 30) -> dict:
    """Write base + head as an official Orthrus folder (a Qwen3 folder with block_size,
    mask_token_id and self_attn.*_diff tensors). See the module docstring for how the MASK
    embedding is placed without changing the AR view. Tokenizer files: copied from `source` (the
    Hugging Face folder the base came from), else written from `tokenizer` (a BPETokenizer,
    e.g. of a GGUF). Returns a summary dict (files, tied, how the MASK row was written)."""
    from safetensors.torch import save_file

    c = base.config
    if not c.qk_norm:
        raise UserError("the official Orthrus format is Qwen3-only; this base is Llama-family (no q/k norm)")
    if head is None:
        raise UserError("export_official needs a diffusion head (train one first)")
    block_size = int(block_size or head.max_trained_draft_len)
    if block_size < 2:
        raise UserError(f"block_size must be >= 2, got {block_size}")
    if source is not None and os.path.abspath(source) == os.path.abspath(out_dir):
        raise UserError(f"export_official would overwrite its source folder {source}; write to a new folder")
    dtype = _as_dtype(dtype) if dtype is not None else base.embed_tokens.weight.dtype
    m = head.mask_id
    cpu = lambda t: t.detach().to(device="cpu", dtype=dtype).contiguous()  # noqa: E731

    tensors, notes = {}, []
    E = cpu(base.embed_tokens.weight)
    mask_row = cpu(head.mask_embedding)
    same_row = torch.equal(E[m], mask_row)
    tied_out = c.tie_embeddings and same_row
    side_rows = None
    if same_row:
        tensors["model.embed_tokens.weight"] = E
        how = "unchanged (the head's MASK embedding equals the base's row)"
    else:
        embed = E.clone()
        embed[m] = mask_row
        tensors["model.embed_tokens.weight"] = embed
        if c.tie_embeddings:
            how = ("row written into embed_tokens; untied: lm_head.weight keeps the base's original matrix "
                   "(orthrus_base_tied marks it for our loader)")
        else:
            side_rows = {"model.embed_tokens.weight.base_row": E[m].clone()}
            how = f"row written into embed_tokens; the base's original row saved in {BASE_ROWS_FILE}"
    if not tied_out:
        tensors["lm_head.weight"] = E if c.tie_embeddings else cpu(base.lm_head.weight)
    for name, p in base.named_parameters():
        if name not in ("embed_tokens.weight", "lm_head.weight"):
            tensors["model." + name] = cpu(p)
    for i, attn in enumerate(head.attn):
        for n in OFFICIAL_DIFF:
            tensors[f"model.layers.{i}.self_attn.{n}_diff.weight"] = cpu(getattr(attn, n).weight)

    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # weights of an earlier export must not mix with these
        if stale.endswith(".safetensors") or stale == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, stale))
    files = _save_sharded(tensors, out_dir, max_shard_bytes, save_file)
    if side_rows is not None:
        save_file(side_rows, os.path.join(out_dir, BASE_ROWS_FILE), metadata={"format": "pt"})
        files.append(BASE_ROWS_FILE)

    src_cfg = {}
    if source is not None and os.path.isdir(source):
        src_cfg = _read_json(os.path.join(source, "config.json")) or {}
    cfg = dict(src_cfg)
    for k in ("block_size", "mask_token_id", "orthrus_base_tied", "orthrus_trained_draft_lens", "rope_scaling",
              "rope_parameters", "torch_dtype"):
        cfg.pop(k, None)
    cfg.update({
        "model_type": "qwen3", "architectures": src_cfg.get("architectures") or ["Qwen3ForCausalLM"],
        "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": c.mlp_hidden,
        "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
        "head_dim": c.head_dim, "hidden_act": "silu", "max_position_embeddings": c.context_len,
        "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta, "rope_scaling": None,
        "attention_bias": False, "use_sliding_window": False, "tie_word_embeddings": tied_out,
        "dtype": str(dtype).replace("torch.", ""),
        "block_size": block_size, "mask_token_id": m,
        "orthrus_trained_draft_lens": list(head.trained_draft_lens),
    })
    if c.tie_embeddings and not tied_out:
        cfg["orthrus_base_tied"] = True
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    files.append("config.json")
    files += _write_tokenizer_files(out_dir, source, tokenizer, notes)
    return {"out_dir": out_dir, "files": files, "tied": tied_out, "mask_row": how, "block_size": block_size,
            "notes": notes}


def _save_sharded(tensors, out_dir, max_shard_bytes, save_file):
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    files, weight_map = [], {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update((name, fname) for name in shard)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + ["model.safetensors.index.json"]


def _write_tokenizer_files(out_dir, source, tokenizer, notes):
    if source is not None and os.path.isdir(source):
        copied = []
        for name in TOKENIZER_FILES:
            src = os.path.join(source, name)
            if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
                shutil.copyfile(src, os.path.join(out_dir, name))
                copied.append(name)
        return copied
    if tokenizer is not None and hasattr(tokenizer, "to_tokenizer_json"):
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(tokenizer.to_tokenizer_json(), f, ensure_ascii=False)
        tc = {"chat_template": tokenizer.chat_template} if tokenizer.chat_template else {}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(tc, f, indent=2)
        eos = tokenizer.special_ids.get("eos")
        if eos is not None:
            with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
                json.dump({"eos_token_id": eos}, f, indent=2)
        return ["tokenizer.json", "tokenizer_config.json"] + (["generation_config.json"] if eos is not None else [])
    notes.append("no tokenizer files written (pass source= or tokenizer=)")
    return []

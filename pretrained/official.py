"""
The official Orthrus checkpoint format, read and written. An official folder is a Qwen3 folder
whose config.json adds `block_size` and `mask_token_id` and whose weights add, per layer i,
model.layers.{i}.self_attn.{q,k,v,o}_proj_diff.weight and self_attn.{q,k}_norm_diff.weight (the
head's attention, head.attn[i]). The official code reads MASK through the embedding table, so on
load the head's mask_embedding = embed_tokens row mask_token_id, and draft_lens = [block_size].

Export must put our trained MASK embedding at row mask_token_id of embed_tokens WITHOUT changing
what the AR view computes:
  - the MASK row equals the base's row (an untrained head): written unchanged, tied stays tied;
  - tied base: the export is UNTIED: lm_head.weight = the base's matrix, embed_tokens.weight = the
    same matrix with row mask_token_id replaced, and `orthrus_base_tied: true` so our loader
    re-ties it (a row written into a tied table would also change that logit in every softmax);
  - untied base: row mask_token_id of embed_tokens is replaced; the base's original row goes to a
    side file, orthrus_base_rows.safetensors, which our loader puts back.
So for every input without mask_token_id the exported AR view gives bit-identical logits; our own
round trip export -> load_pretrained is bit-identical (`orthrus_trained_draft_lens` keeps the
list). Llama-family bases are refused (the official format is Qwen3).
"""

import dataclasses
import json
import os
import shutil

import torch

from diffusion_head import check_draft_lens
from cli import parse_dtype
from errors import UserError
from model import GPT
from pretrained.bpe import byte_tokenizer_json
from pretrained.loading import read_json

OFFICIAL_DIFF = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")  # head.attn[i].<name>
BASE_ROWS_FILE = "orthrus_base_rows.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def finish_official_head(folder, cfg, base, head):
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
            from safetensors.torch import load_file  # optional package

            row = load_file(rows).get("model.embed_tokens.weight.base_row")
            if row is None or tuple(row.shape) != (base.config.n_embd,):
                raise UserError(f"{rows} lacks a model.embed_tokens.weight.base_row of {base.config.n_embd} values; "
                                f"delete the file (the base's MASK row is then the head's)")
            E[m].copy_(row)


def export_official(base: GPT, head, out_dir, *, tokenizer=None, source=None, block_size=None, dtype=None,
                    max_shard_bytes=4 << 30) -> dict:
    """Write base + head as an official Orthrus folder (a Qwen3 folder with block_size,
    mask_token_id and self_attn.*_diff tensors). See the module docstring for how the MASK
    embedding is placed without changing the AR view. Tokenizer files: copied from `source` (the
    Hugging Face folder the base came from), else written from `tokenizer` (a BPETokenizer,
    e.g. of a GGUF). Returns a summary dict (files, tied, how the MASK row was written)."""
    from safetensors.torch import save_file  # optional package

    c = base.config
    if not c.qk_norm:
        raise UserError("the official Orthrus format is Qwen3-only; this base is Llama-family (no q/k norm)")
    if head is None:
        raise UserError("export_official needs a diffusion head (train one first)")
    block_size = check_draft_lens([block_size or head.max_draft_len], "block_size")[0]
    if source is not None and os.path.abspath(source) == os.path.abspath(out_dir):
        raise UserError(f"export_official would overwrite its source folder {source}; write to a new folder")
    dtype = parse_dtype(dtype) if dtype is not None else base.embed_tokens.weight.dtype
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
        src_cfg = read_json(os.path.join(source, "config.json")) or {}
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
        "orthrus_trained_draft_lens": list(head.draft_lens),
    })
    if c.tie_embeddings and not tied_out:
        cfg["orthrus_base_tied"] = True
    if cfg.get("eos_token_id") is None and tokenizer is not None:  # the official generate compares against it
        cfg["eos_token_id"] = getattr(tokenizer, "special_ids", {}).get("eos", tokenizer.eot_id)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    files.append("config.json")
    files += _write_tokenizer_files(out_dir, source, tokenizer, notes)
    umask = os.umask(0)  # read it (there is no getter) and put it back
    os.umask(umask)
    for name in files:  # safetensors writes its files owner-only; the folder's files share one mode
        os.chmod(os.path.join(out_dir, name), 0o666 & ~umask)
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
    if tokenizer is not None and (hasattr(tokenizer, "to_tokenizer_json") or tokenizer.kind == "byte"):
        data = tokenizer.to_tokenizer_json() if tokenizer.kind != "byte" else \
            byte_tokenizer_json(tokenizer.eot_id, tokenizer.mask_id)
        with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False)
        tc = {"chat_template": tokenizer.chat_template} if getattr(tokenizer, "chat_template", None) else {}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(tc, f, indent=2)
        eos = getattr(tokenizer, "special_ids", {}).get("eos", tokenizer.eot_id)
        if eos is not None:
            with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
                json.dump({"eos_token_id": eos}, f, indent=2)
        return ["tokenizer.json", "tokenizer_config.json"] + (["generation_config.json"] if eos is not None else [])
    notes.append("no tokenizer files written (pass source= or tokenizer=)")
    return []

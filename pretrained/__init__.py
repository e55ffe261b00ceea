"""
Real pretrained models: Hugging Face folders (Qwen3, Llama family; pretrained/hf.py), GGUF files
(pretrained/gguf.py) and the official Orthrus format (pretrained/official.py), with their
byte-level BPE tokenizers (pretrained/bpe.py). The rest of the code sees only a `model.GPT`, an
optional `diffusion_head.DiffusionHead` and a tokenizer.

    base, head, tok, info = load_pretrained("path/to/Qwen3-0.6B")        # HF folder
    base, head, tok, info = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")
    ids, end_of_turn = chat_prompt(tok, "Write a haiku.")                  # ChatML prompt ids

MASK id (the head owns its trainable MASK embedding, so the base's row never changes): the first
padded embedding row when the model has one (Qwen3: 151669, the official choice), else an added
token that text never produces and the chat format never uses (SmolLM2: id 16 "<empty_output>").
load_pretrained(mask_id=...) overrides it. Every bad input is a one-line errors.UserError.
"""

import dataclasses
import os
import time

import torch

from cli import parse_dtype
from errors import UserError
from model import GPTConfig
from pretrained.bpe import BPETokenizer, gguf_fields, open_gguf
from pretrained.gguf import gguf_config, load_gguf
from pretrained.hf import hf_config_to_gpt, load_hf_folder, read_hf_config


def is_pretrained_path(path) -> bool:
    """A folder or a .gguf file: what load_pretrained reads (our checkpoints are .pt files, never
    folders, so a folder is a Hugging Face model or refused for what it lacks, config.json first)."""
    path = os.fspath(path)
    return os.path.isdir(path) or (path.endswith(".gguf") and os.path.isfile(path))


def load_pretrained(path, device="cpu", dtype=torch.float32, *, context_len=None, mask_id=None):
    """(base GPT, DiffusionHead or None, tokenizer, info) from a Hugging Face / official Orthrus
    folder or a .gguf file; models in eval mode with requires_grad False.

    context_len: lower the model's context (default: its max_position_embeddings / context_length).
    mask_id: the MASK id to use instead of the default choice (see the module docstring).
    info: format, architecture, config, stop_ids (end of generation), end_of_turn_id, chat,
    mask_id and why, tied, source tensor types, parameter counts, notes, load seconds."""
    t0 = time.perf_counter()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"no such model file or folder: {path}")
    device, dtype = torch.device(device), parse_dtype(dtype)
    if os.path.isdir(path):
        base, head, tok, info = load_hf_folder(path, device, dtype, context_len, mask_id)
    elif path.endswith(".gguf"):
        base, head, tok, info = load_gguf(path, device, dtype, context_len, mask_id)
    else:
        raise UserError(f"{path} is neither a model folder (with config.json) nor a .gguf file")
    base.requires_grad_(False).eval()
    if head is not None:
        head.requires_grad_(False).eval()
    info.update(path=path, dtype=str(dtype).replace("torch.", ""), n_params=base.num_params(),
                head_params=sum(p.numel() for p in head.parameters()) if head is not None else 0,
                mask_id=tok.mask_id, mask_choice=tok.mask_choice, chat=tok.chat_format is not None,
                end_of_turn_id=tok.end_of_turn_id, tied=base.config.tie_embeddings,
                config=dataclasses.asdict(base.config), seconds=time.perf_counter() - t0)
    return base, head, tok, info


def read_config(path) -> GPTConfig:
    """The GPTConfig of a model folder or .gguf file, without reading the weights (train.py --dry-run)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return hf_config_to_gpt(read_hf_config(path), path)
    reader = open_gguf(path)
    return gguf_config(gguf_fields(reader), {t.name: [int(x) for x in t.shape] for t in reader.tensors}, path)


def load_model_tokenizer(path):
    """The tokenizer load_pretrained(path) returns (the model's vocabulary size and MASK id
    included), without reading the weights: for tokenizing data with a model's own tokenizer."""
    path = os.fspath(path)
    if os.path.isdir(path):
        cfg = read_hf_config(path)
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

"""
Reading a pretrained model's tensors into a GPT with about one copy of the weights in memory: the
GPT is built on the `meta` device (no random init), given uninitialised storage in the target
dtype and device, and every tensor from the file is copied into place one at a time, in row
chunks for big ones. Every parameter must be filled exactly once and every tensor in the file
used; a one-line UserError names the first offender.
"""

import json
import os
import re

import torch

from diffusion_head import DRAFT_LEN, DiffusionHead
from errors import UserError, first_line
from model import GPT, GPTConfig, rope_table

CHUNK_VALUES = 1 << 22  # big tensors are read and converted in row chunks of about this many values



def empty_models(config: GPTConfig, device, dtype, head_mask_id=None, draft_lens=(DRAFT_LEN,)):
    """A GPT (and a DiffusionHead when head_mask_id is given) with uninitialised storage: built on
    the meta device, so no random init and no second copy; the caller fills every parameter.
    Non-persistent buffers (the RoPE table) are recomputed for real."""
    with torch.device("meta"):
        base = GPT(config)
        head = DiffusionHead(base, head_mask_id, draft_lens) if head_mask_id is not None else None
    base = base.to(dtype=dtype).to_empty(device=device)
    if config.tie_embeddings:  # to_empty gives each module its own new tensor: tie again
        base.lm_head.weight = base.embed_tokens.weight
    buffers = {name for name, _ in base.named_buffers()}
    if buffers:
        if buffers != {"rope_cos", "rope_sin"}:
            raise RuntimeError(f"pretrained.loading.empty_models does not know how to rebuild GPT buffers {sorted(buffers)}")
        cos, sin = rope_table(config.head_dim, config.context_len, config.rope_theta)
        with torch.no_grad():
            base.rope_cos.copy_(cos)
            base.rope_sin.copy_(sin)
    if head is not None:
        head = head.to(dtype=dtype).to_empty(device=device)
    return base, head


class Filler:
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


def read_json(path, required=False):
    """The JSON object (a dict: every file a model folder holds is one) in path; None if absent."""
    if not os.path.isfile(path):
        if required:
            raise UserError(f"{path} not found")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({first_line(e, 100)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {json_type(data)}, not an object ({{\"key\": value, ...}}); "
                        "the file is damaged or not the one the model needs")
    return data


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), "null")


def gpt_config(values: dict, keys: dict, where: str) -> GPTConfig:
    """GPTConfig(**values), refused in the words of the file the values came from: keys maps each
    field to that file's key (n_head -> num_attention_heads), so the line names what to fix there,
    not train.py's flags."""
    try:
        return GPTConfig(**values)
    except UserError as e:
        fields = r"\b(" + "|".join(sorted(keys, key=len, reverse=True)) + r")\b(?: \(--[a-z-]+\))?"
        raise UserError(f"{where}: {re.sub(fields, lambda m: keys[m.group(1)], str(e))}") from None


def context_len_of(model_max, wanted, where):
    if wanted is None:
        return model_max
    if not isinstance(wanted, int) or not 1 <= wanted <= model_max:
        raise UserError(f"context_len must be an integer in 1..{model_max} (the context {where} was trained for), "
                        f"got {wanted!r}")
    return wanted

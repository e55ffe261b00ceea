"""
Training, in two stages, each one visible loop:

  base  pre-train the autoregressive GPT (next-token cross-entropy)
  head  freeze that GPT and train only the Orthrus diffusion head by KL distillation from it
        (arXiv 2605.12825, Sec. 3.3): many anchor blocks per sequence in one masked forward

Quick start (CPU, ~10 + ~10 minutes on 2 cores; data first: `python data/prepare.py`):
    python train.py --preset cpu                                    # -> out/base/ckpt.pt
    python train.py --stage head --preset cpu --base-ckpt out/base/ckpt.pt   # -> out/head/ckpt.pt
One GPU:
    python train.py --preset gpu
    python train.py --stage head --preset gpu --base-ckpt out/base/ckpt.pt
Resume an interrupted run exactly where its last checkpoint left it, from any folder (its saved
configuration; only --device and --max-steps may change, a larger --max-steps trains a finished
run further, and --data-dir says where the same data is now if it moved):
    python train.py --resume --out-dir out/base
    python train.py --resume --out-dir out/base --max-steps 1600
A run whose loss turns NaN/inf stops at once (exit code 2) without saving the bad state.
Data-parallel head training on N processes or GPUs (torch.distributed; --batch-size is the global
batch, split across the processes, so the run follows the same trajectory as one process):
    torchrun --nproc_per_node 2 train.py --stage head --preset gpu --base-ckpt out/base/ckpt.pt

Every field of TrainConfig and GPTConfig is a flag (`python train.py --help`); a preset sets
several at once and explicit flags override it.
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks import estimate
from checkpoint import (build_base, build_head, clean_state_dict, load_checkpoint, same_tokenizer, save_checkpoint,
                        state_sha256, tokenizer_model_tensor, unpack_head)
from cli import (ArgumentParser, add_dataclass_flags, autocast, dataclass_from, fmt_time, hold_folder, int_list,
                 pick_autocast_dtype, pick_device, run_cli)
from decoding import sync_device
from diffusion_head import DiffusionHead, check_draft_lens
from errors import UserError
from model import GPT, GPTConfig, config_field
from pretrained import is_pretrained_path, load_pretrained, read_config
from training.anchors import choose_anchors, response_anchors
from training.attention import grouped_attention
from training.data import TokenData, load_data, read_data_meta
from training.loss import chunked_head_loss, expected_tokens_per_cycle
from training.ranks import Ranks


@dataclass
class TrainConfig:
    stage: str = config_field("base", "'base' (pre-train the GPT) or 'head' (train the diffusion head of a frozen base)", ("base", "head"))
    data_dir: str = config_field("data/stdlib", "folder written by data/prepare.py (a corpus: train.bin, val.bin) or "
                                 "data/self_distill.py (a model's own answers: packed rows); both hold a meta.json")
    out_dir: str = config_field("", "where ckpt.pt goes (default: out/base or out/head)")
    base_ckpt: str = config_field("", "head stage: the base checkpoint to freeze and distil from")
    device: str = config_field("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = config_field("auto", "autocast dtype: auto (bf16 where native), float32 or bfloat16", ("auto", "float32", "bfloat16"))
    compile: bool = config_field(False, "base stage: torch.compile the training forward")
    seed: int = config_field(1337, "seeds the model init and the data/anchor sampler")
    max_steps: int = config_field(1000, "optimizer steps")
    batch_size: int = config_field(8, "sequences per micro-batch")
    grad_accum: int = config_field(1, "micro-batches per optimizer step")
    seq_len: int = config_field(0, "training sequence length (0 = the model's context_len)")
    lr: float = config_field(1e-3, "peak learning rate")
    min_lr_ratio: float = config_field(0.1, "final learning rate as a fraction of lr (cosine decay)")
    warmup_steps: int = config_field(50, "linear warm-up steps")
    weight_decay: float = config_field(0.1, "AdamW weight decay, applied to matrices only (not norms)")
    beta1: float = config_field(0.9, "AdamW beta1")
    beta2: float = config_field(0.95, "AdamW beta2")
    grad_clip: float = config_field(1.0, "clip the global gradient norm to this (0 = off)")
    eval_interval: int = config_field(200, "evaluate on val every N steps (and at the end)")
    eval_batches: int = config_field(8, "val micro-batches per evaluation (the same windows every time)")
    ckpt_interval: int = config_field(200, "write the checkpoint every N steps (and at the end)")
    log_interval: int = config_field(10, "print the progress line every N steps")
    # head stage only
    draft_lens: str = config_field("8,16,32", "head: draft block lengths K to train, one drawn per step (comma list)")
    anchors: str = config_field("random", "head: anchor placement, 'random' (2T/K distinct positions) or 'aligned' (every K)", ("random", "aligned"))
    anchors_per_seq: int = config_field(0, "head: random anchors per sequence (0 = 2T/K)")
    loss: str = config_field("kl", "head: 'kl' (distil the base's distribution) or 'ce' (data labels; ablation)", ("kl", "ce"))
    loss_position_decay: float = config_field(0.0, "head: weight block index i by exp(-i / decay) in the training loss, "
                                              "rescaled to mean 1 (0 = uniform, the paper's objective; an ablation, "
                                              "not in the paper)")
    init_head: str = config_field("", "head: start from the weights of this head checkpoint (one trained before on "
                                  "the same base, e.g. checkpoints/smollm2_head.pt), with a fresh optimizer and "
                                  "schedule; --resume continues a run exactly instead")
    mask_first: float = config_field(0.0, "head: fraction of training blocks that open with MASK instead of the "
                                     "pending token (the layout of a block drafted before that token is known, for "
                                     "one-forward-per-cycle decoding; 0 = the paper's blocks only)")
    loss_chunk_logits: int = config_field(1 << 24, "head: draft logits (blocks x K x vocab) computed at once in the loss; "
                                          "chunks are recomputed in backward (0 = all at once)")
    grad_checkpoint: bool = config_field(False, "head: recompute each layer's activations in backward (less memory)")


# Presets: named bundles of flags. Model fields (GPTConfig) apply to the base stage only.
PRESETS = {
    "base": {
        # ~3.2M parameters, byte-level: ~10 minutes on 2 CPU cores (fp32). 4 layers so that base +
        # head fit the shipped <= 10 MB fp16 checkpoint (8.0 MB) and decoding stays fast.
        "cpu": dict(n_layer=4, n_embd=256, n_head=8, n_kv_head=4, head_dim=32, mlp_hidden=768, context_len=512,
                    batch_size=4, max_steps=800, lr=2e-3, warmup_steps=30, eval_interval=150, ckpt_interval=50),
        # ~76M parameters for one GPU (bf16 + compile)
        "gpu": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=4, head_dim=64, mlp_hidden=2048, context_len=1024,
                    batch_size=32, grad_accum=2, max_steps=5000, lr=6e-4, warmup_steps=200, compile=True,
                    eval_interval=500, ckpt_interval=500),
        # the separate draft model of two-model speculative decoding (bench.py's baseline): 0.91M
        # parameters, more than the CPU head's 0.79M, so Orthrus is compared with a drafter at
        # least as large as its own extra weights; same data, tokenizer and context
        "draft": dict(n_layer=2, n_embd=192, n_head=6, n_kv_head=2, head_dim=32, mlp_hidden=576, context_len=512,
                      batch_size=4, max_steps=800, lr=3e-3, warmup_steps=30, eval_interval=200, ckpt_interval=100),
        # seconds, for tests
        "tiny": dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=8, mlp_hidden=64, context_len=64,
                     batch_size=4, max_steps=20, lr=3e-3, warmup_steps=5, eval_interval=10, eval_batches=2,
                     ckpt_interval=10, log_interval=5),
    },
    "head": {
        # ~10 minutes on 2 CPU cores for the CPU base preset's model
        "cpu": dict(batch_size=2, max_steps=300, lr=1e-3, warmup_steps=20, weight_decay=0.0, eval_interval=100,
                    ckpt_interval=50, eval_batches=2),
        "gpu": dict(batch_size=16, max_steps=4000, lr=2e-4, warmup_steps=200, weight_decay=0.0, compile=False,
                    eval_interval=500, ckpt_interval=500),
        "tiny": dict(batch_size=2, max_steps=10, lr=3e-3, warmup_steps=2, weight_decay=0.0, eval_interval=5,
                     eval_batches=1, ckpt_interval=5, log_interval=5, draft_lens="4,6"),
    },
}


# ---------------------------------------------------------------------------------------------
# What both stages' loops share


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(module: torch.nn.Module, cfg: TrainConfig, device):
    """AdamW; weight decay on matrices (2-D+: projections, embeddings) only, never on norms/vectors."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def restore(ckpt, key: str, module, optimizer, generator) -> int:
    """Load a resumed run's trained weights (ckpt[key]), optimizer and data-sampler state; return
    the step to continue from (0 for a fresh run)."""
    if ckpt is None:
        return 0
    module.load_state_dict(ckpt[key])
    optimizer.load_state_dict(ckpt["optimizer"])
    generator.set_state(ckpt["data_rng"])
    return ckpt["step"]


RANKS = Ranks()


def set_lr(optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class Run:
    """The bookkeeping both stages' loops share: the progress line, the checkpoint on disk, and the
    divergence stop: a non-finite loss, gradient or weight stops the run with a UserError before
    the bad update is applied or saved, so the checkpoint on disk stays the last good one."""

    def __init__(self, cfg: TrainConfig, start_step: int, tokens_per_step: int):
        self.cfg, self.start, self.tokens_per_step = cfg, start_step, tokens_per_step
        self.saved = start_step if start_step > 0 else None  # the step of the checkpoint on disk, if this run has one
        self.window_start, self.window_steps, self.loss_ema = None, 0, None

    def on_disk(self) -> str:
        if self.saved is None:
            return "no checkpoint of this run was written"
        return f"the checkpoint on disk, {ckpt_path(self.cfg)} (step {self.saved}), is intact"

    def diverged(self, what: str, at: int):
        raise UserError(f"{what} at step {at}: the run diverged and was stopped without saving; {self.on_disk()}. "
                        f"Start a new run with a lower --lr (this one used {self.cfg.lr:g}) or a longer --warmup-steps "
                        "(--resume would repeat the same configuration)")

    def update(self, optimizer, params: list, loss: float, done: int):
        """Check the step's loss and global gradient norm, clip (max_norm inf when --grad-clip 0:
        scales by exactly 1.0), apply the update."""
        if not math.isfinite(loss):
            self.diverged(f"the training loss became {loss}", done)
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)
        if not math.isfinite(norm.item()):
            self.diverged(f"the gradient norm became {norm.item()}", done)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def log(self, done: int, loss: float, lr: float):
        """The progress line every --log-interval steps: speed over the steps since the last line
        (the first two steps, with compilation and allocator warm-up, are left out)."""
        self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
        if done - self.start == 2:
            self.window_start, self.window_steps = time.time(), 0
        elif self.window_start is not None:
            self.window_steps += 1
        if done % self.cfg.log_interval == 0 or done == self.cfg.max_steps:
            if self.window_steps > 0:
                per_step = (time.time() - self.window_start) / self.window_steps
                speed = f"{self.tokens_per_step / per_step:,.0f} tok/s | ETA {fmt_time(per_step * (self.cfg.max_steps - done))}"
            else:
                speed = "warming up"
            print(f"step {done:>6}/{self.cfg.max_steps} | loss {loss:.4f} (ema {self.loss_ema:.4f}) | lr {lr:.2e} | "
                  f"{speed}", flush=True)

    def restart_window(self, done: int):
        """After the step's evaluation and save: they do not count in the speed."""
        if self.window_start is not None and done % self.cfg.log_interval == 0:
            self.window_start, self.window_steps = time.time(), 0

    def save(self, params: list, save, done: int):
        if not all(bool(torch.isfinite(p).all()) for p in params):
            self.diverged("the weights became non-finite", done)
        save(done)
        self.saved = done

    def interrupted(self, step: int):
        resume = f" (resume with --resume --out-dir {out_dir(self.cfg)})" if self.saved is not None else ""
        print(f"\ninterrupted at step {step}; {self.on_disk()}{resume}", flush=True)
        raise SystemExit(130)


# ---------------------------------------------------------------------------------------------
# Stage 1: base pre-training


def train_base(cfg: TrainConfig, model_cfg: GPTConfig, resume_ckpt=None):
    if RANKS.world > 1:
        raise UserError("--stage base trains in one process; data-parallel training (torchrun) is for --stage head")
    seq_len = cfg.seq_len or model_cfg.context_len
    if seq_len > model_cfg.context_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's --context-len {model_cfg.context_len}")
    device = pick_device(cfg.device)
    amp = pick_autocast_dtype(device, cfg.dtype)
    data = TokenData(cfg.data_dir)
    data.check_length(seq_len + 1, "training windows")
    if model_cfg.vocab_size != data.meta["vocab_size"]:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=data.meta["vocab_size"])
    try:  # read once, now: a missing tokenizer.model must not surface at the first save
        tokenizer_blob = tokenizer_model_tensor(data.meta["tokenizer"], cfg.data_dir)
    except (OSError, KeyError) as e:
        raise UserError(f"{cfg.data_dir} lacks its sentencepiece model ({type(e).__name__}: {e}); run "
                        "`python data/prepare.py --tokenizer sentencepiece ...` again") from None
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(device)
    optimizer = make_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = restore(resume_ckpt, "model", model, optimizer, gen)
    print(f"base model: {model.num_params() / 1e6:.2f}M parameters, {json.dumps(dataclasses.asdict(model_cfg))}")
    print(f"data: {data.train.numel():,} train / {data.val.numel():,} val tokens; {cfg.max_steps} steps of "
          f"{cfg.batch_size}x{cfg.grad_accum}x{seq_len} tokens; starting at step {start}")
    fwd = torch.compile(model) if cfg.compile else model

    def lm_loss(idx):
        with autocast(device, amp):
            logits = fwd(idx[:, :-1], logits="all")
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))

    val_loss = [float("nan")]

    @torch.no_grad()
    def evaluate(step):
        model.eval()
        g = torch.Generator().manual_seed(12345)  # the same windows at every evaluation
        losses = [lm_loss(data.val_windows(cfg.batch_size, seq_len + 1, g)[0].to(device)).item()
                  for _ in range(cfg.eval_batches)]
        model.train()
        val_loss[0] = sum(losses) / len(losses)
        print(f"eval step {step}: val loss {val_loss[0]:.4f} ({val_loss[0] / math.log(2):.3f} bits/token)", flush=True)

    def save(step):
        save_checkpoint({
            "kind": "orthrus-base", "format_version": 1,
            "model_config": dataclasses.asdict(model_cfg), "model": clean_state_dict(model),
            "tokenizer": data.meta["tokenizer"], "data_dir": cfg.data_dir,
            "tokenizer_model": tokenizer_blob,
            "optimizer": optimizer.state_dict(), "data_rng": gen.get_state(), "step": step,
            "train_config": dataclasses.asdict(cfg), "val_loss": val_loss[0],
        }, ckpt_path(cfg))
        print(f"saved {ckpt_path(cfg)} (step {step})", flush=True)

    model.train()
    run, params = Run(cfg, start, cfg.batch_size * cfg.grad_accum * seq_len), list(model.parameters())
    step = start
    try:
        for step in range(start, cfg.max_steps):
            lr = set_lr(optimizer, lr_at(step, cfg))
            total = 0.0
            for _ in range(cfg.grad_accum):
                loss = lm_loss(data.train_windows(cfg.batch_size, seq_len + 1, gen)[0].to(device)) / cfg.grad_accum
                loss.backward()
                total += loss.item()
            run.update(optimizer, params, total, step + 1)
            sync_device(device)
            done = step + 1
            run.log(done, total, lr)
            if done % cfg.eval_interval == 0 and done != cfg.max_steps:
                evaluate(done)
            if done % cfg.ckpt_interval == 0 and done != cfg.max_steps:
                run.save(params, save, done)
            run.restart_window(done)
    except KeyboardInterrupt:
        run.interrupted(step)
    evaluate(cfg.max_steps)  # the loop always ends with an evaluation and a save
    run.save(params, save, cfg.max_steps)
    return model


# ---------------------------------------------------------------------------------------------
# Stage 2: the diffusion head of a frozen base


def check_draft_fits(draft_lens: list, seq_len: int):
    if draft_lens[-1] > seq_len // 2:
        raise UserError(f"draft length {draft_lens[-1]} is too long for training sequences of {seq_len} tokens")


def parse_draft_lens(text: str) -> list:
    return check_draft_lens(int_list(text, "--draft-lens"), "--draft-lens")


def base_kv_and_logits(base: GPT, idx: torch.Tensor):
    """The frozen base's forward over idx: teacher logits (B, T, V) and every layer's K/V, taken
    from a KV cache exactly as the AR view writes it at inference time."""
    B, T = idx.shape
    cache = base.new_cache(batch_size=B, capacity=T)
    logits = base(idx, cache, logits="all")
    ks = [cache.k[i, :, :, :T] for i in range(base.config.n_layer)]
    vs = [cache.v[i, :, :, :T] for i in range(base.config.n_layer)]
    return logits, ks, vs


def plan_blocks(windows, K: int, placement: str, generator, seq_len: int, anchors_per_seq: int, anchors=None):
    """(tokens, anchors, weight) for one global batch: anchors chosen once for all its rows
    (unless given; with a response mask, only where some row's block targets are all the base's
    answer) and weight (B, N), which (row, block) pairs count (None: all)."""
    idx, response = windows
    usable = None if response is None else response_anchors(response, K)  # (B, T-K+1)
    if anchors is None:
        anchors = choose_anchors(seq_len, K, placement, generator, anchors_per_seq if placement == "random" else 0,
                                 None if usable is None else usable.any(0))
    return idx, anchors, None if usable is None else usable[:, anchors].float()


def draw_blocks(windows_of, K: int, placement: str, generator, seq_len: int, anchors_per_seq: int, masked: bool):
    """plan_blocks on windows_of()'s windows, anchors drawn before them when there are no response
    masks. With masks, a batch whose rows hold no block with answer targets only is drawn again
    (SelfDistilledData.check_blocks made sure the data holds some)."""
    while True:
        anchors = None if masked else choose_anchors(seq_len, K, placement, generator, anchors_per_seq)
        idx, anchors, weight = plan_blocks(windows_of(), K, placement, generator, seq_len, anchors_per_seq, anchors)
        if anchors.numel():
            return idx, anchors, weight


def block_loss(head, base: GPT, idx, anchors, weight, K: int, cfg: TrainConfig, device, amp, mask_first=None,
               position_decay: float = 0.0):
    """(loss, agreement by block index) of the head on these rows: the frozen base teaches (its
    log-probabilities once per position, and the K/V the head reads), the head drafts."""
    idx, anchors = idx.to(device), anchors.to(device)
    weight = None if weight is None else weight.to(device)
    with autocast(device, amp):
        with torch.no_grad():  # the frozen base: no graph, no gradient for its keys and values
            teacher, ks, vs = base_kv_and_logits(base, idx)
            teacher_logp = F.log_softmax(teacher.float(), dim=-1)  # once per position, shared by its blocks
        hidden = head(base, idx, ks, vs, anchors, K, mask_first=mask_first, attention=grouped_attention(),
                      checkpoint_layers=cfg.grad_checkpoint)  # head: maybe wrapped in DistributedDataParallel
        return chunked_head_loss(base, hidden, teacher_logp, idx, anchors, cfg.loss, weight, cfg.loss_chunk_logits,
                                 position_decay)


def train_head(cfg: TrainConfig, resume_ckpt=None):
    base_path = cfg.base_ckpt  # main() checked it is given; on --resume, resume_config set it
    draft_lens = parse_draft_lens(cfg.draft_lens)
    if cfg.seq_len:  # now, before loading; the default length is checked once it is known
        check_draft_fits(draft_lens, cfg.seq_len)
    if cfg.batch_size % RANKS.world:
        raise UserError(f"--batch-size {cfg.batch_size} (the global batch) must be a multiple of the "
                        f"{RANKS.world} processes; each trains on batch-size / processes rows")
    if resume_ckpt is not None and resume_ckpt.get("world_size", 1) != RANKS.world:
        raise UserError(f"this run was trained on {resume_ckpt.get('world_size', 1)} process(es); resume it with the "
                        f"same number (torchrun --nproc_per_node {resume_ckpt.get('world_size', 1)}), not {RANKS.world}")
    device = RANKS.start(pick_device(cfg.device))
    amp = pick_autocast_dtype(device, cfg.dtype)
    data = load_data(cfg.data_dir)  # before the base checkpoint: the cheaper check first
    pretrained = is_pretrained_path(base_path)
    if pretrained:  # a Hugging Face folder or .gguf file: the head checkpoint will not copy the base
        base, _, tokenizer, _ = load_pretrained(base_path, device, torch.float32)
        base_ckpt = {"tokenizer": tokenizer.meta()}
    else:
        base_ckpt = load_checkpoint(base_path)
        base = build_base(base_ckpt, device)
    base.requires_grad_(False).eval()  # frozen: no gradients, no dropout-like behaviour changes
    base_hash = state_sha256(base.state_dict())
    if resume_ckpt is not None and resume_ckpt["base_sha256"] != base_hash:
        raise UserError(f"{base_path} is not the base this head was trained on (sha256 differs); "
                        "pass the original base checkpoint")
    if not same_tokenizer(data.meta["tokenizer"], base_ckpt["tokenizer"]):
        raise UserError(f"--data-dir {cfg.data_dir} was tokenized with {data.meta['tokenizer']['kind']} "
                        f"(vocab {data.meta['vocab_size']}) but the base uses {base_ckpt['tokenizer']['kind']} "
                        f"(vocab {base.config.vocab_size}); prepare the data with the base's tokenizer")
    seq_len = head_seq_len(cfg, base.config.context_len, pretrained, data.meta.get("row_len"))
    if seq_len > base.config.context_len:
        raise UserError(f"--seq-len {seq_len} exceeds the base model's context length {base.config.context_len}")
    check_draft_fits(draft_lens, seq_len)
    if data.meta.get("base_sha256") not in (None, base_hash):
        raise UserError(f"{cfg.data_dir} was written by another base model (data/self_distill.py records its sha256); "
                        "generate it with this --base-ckpt")
    data.check_length(seq_len, "training windows")
    data.check_blocks(draft_lens, seq_len, cfg.anchors)
    torch.manual_seed(cfg.seed)
    head = DiffusionHead(base, base_ckpt["tokenizer"]["mask_id"], draft_lens).to(device)
    optimizer = make_optimizer(head, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = restore(resume_ckpt, "head", head, optimizer, gen)
    if resume_ckpt is None and cfg.init_head:  # a warm start: an earlier head of this base, maybe a shipped one
        init = load_checkpoint(cfg.init_head)
        if init.get("base_sha256") != base_hash:
            raise UserError(f"--init-head {cfg.init_head} was trained on another base (sha256 differs from "
                            f"{base_hash[:12]}...); pass a head of {base_path}")
        state = init["head"] if "head_storage" not in init else unpack_head(init["head"], base.state_dict(),
                                                                            init["head_storage"])
        head.load_state_dict(build_head(dict(init, head=state), base, device, torch.float32).state_dict())
        print(f"head initialised from {cfg.init_head} (trained {init.get('step', '?')} steps before)")
    n_head, n_base = sum(p.numel() for p in head.parameters()), base.num_params()
    print(f"head: {n_head / 1e6:.2f}M trainable parameters = {100 * n_head / (n_head + n_base):.1f}% of base+head "
          f"({n_base / 1e6:.2f}M frozen); draft lengths {draft_lens}, anchors {cfg.anchors}, loss {cfg.loss}")

    @torch.no_grad()
    def evaluate(step):
        head.eval()
        layouts = [False, True] if cfg.mask_first > 0 else [False]  # blocks opening with x_s, with MASK
        for K, opens_with_mask in ((K, m) for K in draft_lens for m in layouts):
            g = torch.Generator().manual_seed(12345)
            losses, agree = [], 0
            for _ in range(cfg.eval_batches):
                idx, anchors, weight = draw_blocks(lambda: data.val_windows(cfg.batch_size, seq_len, g), K, "aligned",
                                                   g, seq_len, cfg.anchors_per_seq, masked=True)
                flags = torch.full((anchors.numel(),), True) if opens_with_mask else None
                loss, a = block_loss(trainable, base, idx, anchors, weight, K, cfg, device, amp, flags)  # uniform weights
                losses.append(loss.item())
                agree = agree + a.mean(0)  # (K-1,) agreement at each block index
            agree = agree / cfg.eval_batches  # (aligned anchors: the same blocks in every batch)
            shown = " ".join(f"{x:.2f}" for x in agree[:8].tolist()) + (" ..." if K - 1 > 8 else "")
            print(f"eval step {step}: K={K}{' MASK-first' if opens_with_mask else ''} val {cfg.loss} "
                  f"{sum(losses) / len(losses):.4f} | agreement by index {shown} | expected tokens/cycle "
                  f"{expected_tokens_per_cycle(agree):.2f}", flush=True)
        head.train()

    def save(step):
        if state_sha256(base.state_dict()) != base_hash:  # the base must come out bit-identical
            raise RuntimeError("the frozen base changed during head training; this is a bug")
        if RANKS.rank != 0:  # rank 0 writes for everyone (the ranks' weights are identical)
            return
        if pretrained:  # the base stays where it is: keep its path and the hash of its float32 load
            kind = {"kind": "orthrus-head", "base_path": os.path.abspath(base_path)}
        else:
            kind = {"kind": "orthrus", "model_config": dict(base_ckpt["model_config"]), "model": clean_state_dict(base),
                    "tokenizer_model": base_ckpt.get("tokenizer_model")}
        save_checkpoint({
            **kind, "format_version": 1, "tokenizer": base_ckpt["tokenizer"], "data_dir": cfg.data_dir,
            "head_config": head.head_config(), "head": clean_state_dict(head), "data_kind": data.meta.get("kind", "corpus"),
            "base_ckpt": base_path, "base_sha256": base_hash,
            "optimizer": optimizer.state_dict(), "data_rng": gen.get_state(), "step": step,
            "train_config": dataclasses.asdict(cfg), "world_size": RANKS.world,
        }, ckpt_path(cfg))
        print(f"saved {ckpt_path(cfg)} (step {step}; base unchanged, sha256 {base_hash[:12]})", flush=True)

    # the loop: one optimizer step per iteration, top to bottom
    head.train()
    trainable = head if RANKS.world == 1 else torch.nn.parallel.DistributedDataParallel(head)
    run, params = Run(cfg, start, cfg.batch_size * cfg.grad_accum * seq_len), list(head.parameters())
    step = start
    try:
        for step in range(start, cfg.max_steps):
            lr = set_lr(optimizer, lr_at(step, cfg))
            total = 0.0
            for micro in range(cfg.grad_accum):
                # a global batch, drawn alike on every rank: a draft length K, anchors (before the
                # windows when there are no response masks), windows, the blocks opening with MASK
                K = draft_lens[torch.randint(len(draft_lens), (1,), generator=gen).item()]
                idx, anchors, weight = draw_blocks(lambda: data.train_windows(cfg.batch_size, seq_len, gen), K,
                                                   cfg.anchors, gen, seq_len, cfg.anchors_per_seq, data.masked)
                global_blocks = anchors.numel() * idx.size(0) if weight is None else float(weight.sum())
                idx, weight = RANKS.rows((idx, weight))  # this rank's rows
                local_blocks = anchors.numel() * idx.size(0) if weight is None else float(weight.sum())
                # drawn only when asked for, so runs without MASK-first blocks keep their random stream
                mask_first = torch.rand(anchors.numel(), generator=gen) < cfg.mask_first if cfg.mask_first > 0 else None
                # DistributedDataParallel averages the gradients across ranks at the last micro-batch
                last_micro = micro == cfg.grad_accum - 1 or not hasattr(trainable, "no_sync")
                with contextlib.nullcontext() if last_micro else trainable.no_sync():
                    loss, _ = block_loss(trainable, base, idx, anchors, weight, K, cfg, device, amp, mask_first,
                                         cfg.loss_position_decay)
                    # this rank's share of the global batch's counted blocks (exactly 1 in one process),
                    # so the ranks' averaged gradients are those of the global mean
                    loss = loss * (max(local_blocks, 1) * RANKS.world / max(global_blocks, 1)) / cfg.grad_accum
                    loss.backward()
                total += loss.item()
            total = RANKS.mean(total)  # every rank sees the same figure (and stops together)
            run.update(optimizer, params, total, step + 1)
            sync_device(device)
            done = step + 1
            run.log(done, total, lr)
            if done % cfg.eval_interval == 0 and done != cfg.max_steps:
                evaluate(done)
            if done % cfg.ckpt_interval == 0 and done != cfg.max_steps:
                run.save(params, save, done)
            run.restart_window(done)
    except KeyboardInterrupt:
        run.interrupted(step)
    evaluate(cfg.max_steps)  # the loop always ends with an evaluation and a save
    run.save(params, save, cfg.max_steps)
    return base, head


# ---------------------------------------------------------------------------------------------
# Command line


def out_dir(cfg: TrainConfig) -> str:
    return cfg.out_dir or os.path.join("out", cfg.stage)


def ckpt_path(cfg: TrainConfig) -> str:
    return os.path.join(out_dir(cfg), "ckpt.pt")


def build_parser():
    p = ArgumentParser(__doc__)
    p.add_argument("--preset", default=None, choices=sorted({name for stage in PRESETS.values() for name in stage}),
                   help="named flag bundle per stage (see PRESETS): base cpu, gpu, draft (the speculative-decoding draft model), tiny; head cpu, gpu, tiny")
    p.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in --out-dir with its saved configuration; only "
                        "--device and --max-steps may change, and --data-dir may say where the same data is now "
                        "(other flags are reported as ignored). A larger "
                        "--max-steps extends a run, finished or not: the cosine schedule then runs to the new "
                        "--max-steps, so the learning rate rises again from where the old schedule had brought it")
    est = p.add_argument_group("estimate (head stage): print the memory and time a run needs, load nothing, train nothing")
    est.add_argument("--dry-run", action="store_true", default=None, help="estimate instead of training")
    est.add_argument("--tflops", type=float, default=None,
                     help="peak TFLOP/s of the device to plan for (default: measure this one); a GPU reaches "
                          f"~{round(100 * estimate.MATMUL_EFFICIENCY)} percent of it")
    est.add_argument("--gpu-memory-gb", type=float, default=None, help="say whether the run fits a device this big")
    est.add_argument("--processes", type=int, default=None, help="processes to plan for (default: this job's)")
    add_dataclass_flags(p, TrainConfig)
    add_dataclass_flags(p, GPTConfig, skip=("vocab_size",))
    return p


def head_seq_len(cfg: TrainConfig, context_len: int, pretrained: bool, row_len=None) -> int:
    """--seq-len, else the data's packed row length (within the context), else the context
    (pretrained contexts are long, 8K-40K: 1,024-token windows then)."""
    if cfg.seq_len:
        return cfg.seq_len
    if row_len:
        return min(row_len, context_len)
    return min(1024, context_len) if pretrained else context_len


def dry_run(args, cfg: TrainConfig) -> dict:
    """The estimate of benchmarks/estimate.py for this head-stage configuration (only the base's config is read)."""
    if cfg.stage != "head" or not cfg.base_ckpt:
        raise UserError("--dry-run estimates a head-stage run: pass --stage head --base-ckpt PATH")
    if is_pretrained_path(cfg.base_ckpt):
        config, pretrained = read_config(cfg.base_ckpt), True
    else:
        config, pretrained = GPTConfig(**load_checkpoint(cfg.base_ckpt)["model_config"]), False
    processes = args.processes or RANKS.world
    if processes < 1 or cfg.batch_size % processes:
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of --processes {processes}")
    lens = parse_draft_lens(cfg.draft_lens)
    meta_path = os.path.join(cfg.data_dir, "meta.json") if cfg.data_dir else None
    row_len = read_data_meta(cfg.data_dir).get("row_len") if meta_path and os.path.isfile(meta_path) else None
    seq_len = head_seq_len(cfg, config.context_len, pretrained, row_len)
    K = sum(lens) / len(lens)
    device = pick_device(cfg.device, verbose=False)
    amp = pick_autocast_dtype(device, cfg.dtype, verbose=False)
    est = estimate.head_run(config, rows_per_process=cfg.batch_size // processes, processes=processes,
                            grad_accum=cfg.grad_accum, seq_len=seq_len, draft_len=K,
                            anchors=cfg.anchors_per_seq or max(1, 2 * seq_len // max(lens)),
                            max_logits=cfg.loss_chunk_logits, grad_checkpoint=cfg.grad_checkpoint,
                            compute_bytes=2 if amp is not None else 4,
                            flash_attention=device.type == "cuda" or args.tflops is not None)
    if args.tflops is not None:
        tflops, where = args.tflops * estimate.MATMUL_EFFICIENCY, f"{estimate.MATMUL_EFFICIENCY:.0%} of {args.tflops:g} peak"
    else:
        tflops, where = estimate.measured_tflops(device, amp or torch.float32, config.n_embd), f"measured on {device}"
        if device.type == "cpu":
            tflops *= estimate.CPU_STEP_EFFICIENCY
            where = f"{estimate.CPU_STEP_EFFICIENCY:.0%} of a matmul {where}, what a training step reaches on a CPU"
    print(f"configuration: {processes} process(es) x {cfg.batch_size // processes} rows x {cfg.grad_accum} "
          f"accumulation x {seq_len} tokens; K {lens}; {cfg.max_steps} steps")
    print(estimate.report(est, tflops, where, args.gpu_memory_gb))
    print(f"whole run: {fmt_time(est['seconds_per_step'] * cfg.max_steps)} for {cfg.max_steps} steps")
    return est


MODEL_FIELDS = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]
HEAD_ONLY = ("base_ckpt", "init_head", "draft_lens", "anchors", "anchors_per_seq", "loss", "loss_position_decay", "mask_first",
             "loss_chunk_logits", "grad_checkpoint")  # TrainConfig fields only the head stage reads
BASE_ONLY = ("compile",)
RESUME_FLAGS = ("device", "out_dir", "max_steps", "data_dir", "base_ckpt")  # what --resume takes from the command line
RESUME_FIELDS = ("train_config", "optimizer", "data_rng", "step")  # what it needs in the checkpoint


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_train_config(cfg: TrainConfig):
    """Every TrainConfig value, before anything is read or built: one line per mistake, and no
    value that would train on NaN or run gradient ascent."""
    def need(ok, name, want):
        if not ok:
            raise UserError(f"{flag(name)} must be {want}, got {getattr(cfg, name)!r}")

    def is_int(name):
        v = getattr(cfg, name)
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(name):
        v = getattr(cfg, name)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    choices = {f.name: f.metadata["choices"] for f in dataclasses.fields(TrainConfig) if f.metadata.get("choices")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"unknown {flag(name)} {getattr(cfg, name)!r}: use {' or '.join(map(repr, allowed))}")
    for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "ckpt_interval",
                 "log_interval"):
        need(is_int(name) and getattr(cfg, name) >= 1, name, ">= 1")
    for name in ("seed", "seq_len", "warmup_steps", "anchors_per_seq", "loss_chunk_logits"):
        need(is_int(name) and getattr(cfg, name) >= 0, name, "an integer >= 0")
    need(cfg.seed < 2**63, "seed", "below 2**63")
    need(is_num("lr") and cfg.lr > 0, "lr", "a finite number > 0")
    need(is_num("min_lr_ratio") and 0 <= cfg.min_lr_ratio <= 1, "min_lr_ratio",
         "in [0, 1] (the final learning rate as a fraction of --lr)")
    need(is_num("weight_decay") and cfg.weight_decay >= 0, "weight_decay", "a finite number >= 0")
    need(is_num("mask_first") and 0 <= cfg.mask_first <= 1, "mask_first", "a fraction in [0, 1]")
    need(is_num("loss_position_decay") and cfg.loss_position_decay >= 0, "loss_position_decay",
         "a finite number >= 0 (0 = uniform)")
    for name in ("beta1", "beta2"):
        need(is_num(name) and 0 <= getattr(cfg, name) < 1, name, "in [0, 1)")
    need(is_num("grad_clip") and cfg.grad_clip >= 0, "grad_clip", "a finite number >= 0 (0 = off)")
    parse_draft_lens(cfg.draft_lens)


def configs_from_args(args):
    flags = {k: v for k, v in vars(args).items() if v is not None}
    stage = flags.get("stage", "base")
    if stage not in PRESETS:
        raise UserError(f"unknown --stage {stage!r}: use 'base' or 'head'")
    model_flags = [flag(name) for name in MODEL_FIELDS if name in flags]
    if stage == "head" and model_flags and not args.resume:
        raise UserError(f"{', '.join(model_flags)}: model flags apply to --stage base only; the head stage takes "
                        "its model from --base-ckpt")
    preset = {}
    if args.preset is not None:
        if args.preset not in PRESETS[stage]:
            raise UserError(f"unknown --preset {args.preset!r} for stage {stage}: choose from {sorted(PRESETS[stage])}")
        preset = PRESETS[stage][args.preset]
    cfg = dataclass_from(TrainConfig, preset, flags)
    model_cfg = dataclass_from(GPTConfig, preset, flags)  # GPTConfig checks its own values
    check_train_config(cfg)
    if not args.resume:  # a flag the stage does not use would be dropped without a word
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        unused = [flag(n) for n in (BASE_ONLY if stage == "head" else HEAD_ONLY) if flags.get(n, defaults[n]) != defaults[n]]
        if unused and stage == "base":
            raise UserError(f"{', '.join(unused)}: head-stage flag{'s' if len(unused) > 1 else ''}, unused by --stage "
                            "base (which trains a new GPT); to train a diffusion head on a base, add --stage head")
        if unused:
            raise UserError(f"{', '.join(unused)}: base-stage flag{'s' if len(unused) > 1 else ''}, unused by --stage "
                            "head (it trains without torch.compile); drop it")
    return cfg, model_cfg


def check_out_dir(cfg: TrainConfig):
    """--out-dir must be a folder we can write to (or create): found now, not at the first save."""
    folder = out_dir(cfg)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--out-dir {folder} is a file; pass a folder (ckpt.pt is written inside it)")
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out-dir {folder}: cannot write to {existing}; pass a folder you can write to")


def resume_config(args, cfg: TrainConfig, resume_ckpt: dict) -> TrainConfig:
    """The saved configuration, with --device, --out-dir, --max-steps and --data-dir (the same
    data's new place) from the command line; every other explicitly given flag is reported as
    ignored (never dropped silently)."""
    path = ckpt_path(cfg)
    missing = [k for k in RESUME_FIELDS if k not in resume_ckpt]
    head_kinds = ("orthrus", "orthrus-head")  # a head on one of our bases, or on a pretrained one
    if missing or (resume_ckpt["kind"] in head_kinds and "base_ckpt" not in resume_ckpt):
        raise UserError(f"{path} has no optimizer/training state (an exported checkpoint?): --resume needs the "
                        "ckpt.pt that train.py wrote")
    saved = dataclass_from(TrainConfig, resume_ckpt["train_config"])
    if (saved.stage == "head") != (resume_ckpt["kind"] in head_kinds):
        raise UserError(f"{path} is a {resume_ckpt['kind']} checkpoint but its run is --stage {saved.stage}: "
                        "the file was edited")
    step = resume_ckpt["step"]
    given = {k: v for k, v in vars(args).items() if v is not None and k not in RESUME_FLAGS + ("resume",)}
    saved_values = {**resume_ckpt.get("model_config", {}), **dataclasses.asdict(saved)}
    given = {k: v for k, v in given.items() if saved_values.get(k, object()) != v}  # the same value is no news
    if given:
        shown = ", ".join(f"{flag(k)} {v}" for k, v in given.items())
        print(f"ignored on --resume (the run keeps its saved configuration; only --device, --max-steps and "
              f"--data-dir apply): {shown}")
    max_steps = saved.max_steps
    if args.max_steps is not None and args.max_steps != saved.max_steps:
        if args.max_steps < step:
            raise UserError(f"--max-steps {args.max_steps} is below the step the run has reached ({step}); "
                            f"pass a larger value to train further")
        max_steps = args.max_steps
        print(f"--max-steps {max_steps} (was {saved.max_steps}): the cosine learning-rate schedule now runs to "
              f"step {max_steps}, so from step {step} on the learning rate follows the new curve")
    data_dir = saved.data_dir  # absolute since it is stored so; a relative one (older runs) is read from here
    if args.data_dir is not None and os.path.abspath(args.data_dir) != os.path.abspath(saved.data_dir):
        data_dir = os.path.abspath(args.data_dir)
        print(f"--data-dir {data_dir}: the run's data is read from here now (it was {saved.data_dir}); the "
              "resume is exact only if this folder holds the same data")
    elif not os.path.isdir(data_dir) and step < max_steps:  # (a finished run needs no data)
        where = "" if os.path.isabs(data_dir) else f" from {os.getcwd()}"
        raise UserError(f"the run's data folder {data_dir} is not found{where}: pass --data-dir with its place now "
                        "(the same data)")
    base_ckpt = resume_ckpt.get("base_ckpt", "")  # a head's base, where it was when the run started
    if args.base_ckpt is not None and base_ckpt and os.path.abspath(args.base_ckpt) != os.path.abspath(base_ckpt):
        base_ckpt = os.path.abspath(args.base_ckpt)
        print(f"--base-ckpt {base_ckpt}: the run's base is read from here now (it was {resume_ckpt['base_ckpt']}); "
              "its hash must match")
    elif base_ckpt and not os.path.exists(base_ckpt) and step < max_steps:
        raise UserError(f"this run's base {base_ckpt} is not found (moved?): pass --base-ckpt with its place now "
                        "(the same base: its hash is checked)")
    # the run continues exactly as configured; only where to run it, and for how long, may change
    cfg = dataclasses.replace(saved, device=cfg.device, out_dir=cfg.out_dir or saved.out_dir, max_steps=max_steps,
                              data_dir=data_dir, base_ckpt=base_ckpt or saved.base_ckpt)
    check_train_config(cfg)
    return cfg


def main(argv=None):
    if RANKS.rank != 0:  # one progress log per job: the other ranks only report errors
        sys.stdout = open(os.devnull, "w")
    args = build_parser().parse_args(argv)
    cfg, model_cfg = configs_from_args(args)  # every flag is checked before anything is read
    if args.dry_run:
        return dry_run(args, cfg)
    pick_device(cfg.device, verbose=False)
    check_out_dir(cfg)
    # one run per --out-dir at a time (rank 0 holds it for a torchrun job)
    with hold_folder(out_dir(cfg)) if RANKS.rank == 0 else contextlib.nullcontext():
        return start(args, cfg, model_cfg)


def start(args, cfg: TrainConfig, model_cfg: GPTConfig):
    """A fresh run, or the resumed one, once its --out-dir is held."""
    if not args.resume and os.path.exists(ckpt_path(cfg)):  # training never loses work
        raise UserError(f"{ckpt_path(cfg)} already exists: continue it with --resume (a larger --max-steps trains it "
                        "further), or pass another --out-dir")
    if not args.resume and cfg.stage == "head" and not cfg.base_ckpt:
        raise UserError("--stage head needs --base-ckpt PATH (a checkpoint from `python train.py --stage base`)")
    if not args.resume:
        read_data_meta(cfg.data_dir)  # a missing or foreign data folder: one line, before any checkpoint is read
        # stored absolute, so that --resume from another folder finds them
        cfg = dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir), base_ckpt=os.path.abspath(
            cfg.base_ckpt) if os.path.exists(cfg.base_ckpt) else cfg.base_ckpt)
    resume_ckpt = None
    if args.resume:
        resume_ckpt = load_checkpoint(ckpt_path(cfg))
        cfg = resume_config(args, cfg, resume_ckpt)
        if cfg.stage == "base":  # a head run takes its model from the base it names
            try:
                model_cfg = GPTConfig(**resume_ckpt["model_config"])
            except (UserError, TypeError) as e:  # TypeError: an unknown field
                raise UserError(f"the checkpoint's model_config is invalid ({e})") from None
        print(f"resuming {ckpt_path(cfg)} at step {resume_ckpt['step']}/{cfg.max_steps} with its saved configuration")
        if resume_ckpt["step"] >= cfg.max_steps:
            print(f"nothing to do: the run is already complete (pass a larger --max-steps than {cfg.max_steps} "
                  "to train further)")
            return None
    if cfg.stage == "base":
        return train_base(cfg, model_cfg, resume_ckpt)
    return train_head(cfg, resume_ckpt)


if __name__ == "__main__":
    run_cli(main)

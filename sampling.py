"""
How tokens are chosen from logits, by plain AR decoding and by both views of Orthrus.

`Sampling` is one value (temperature, top-k, top-p, generator), validated once where input
enters (the command line, the public decode functions). Temperature 0 is greedy decoding: an
argmax branch, never a division by a tiny temperature. Speculative sampling (consensus.py) is
lossless only if the draft and target distributions are exactly the ones drawn from and plain AR
would use, so the diffusion view (draft) and the AR view (target) warp logits with the same
`Sampling.probs`. Every draw takes the explicit generator (None = torch's global one).
"""
import math
from dataclasses import dataclass

import torch

from errors import UserError

# Below this, logits / temperature overflow float32 (|logit| ~ 100 / 1e-37 = inf) long before the
# distribution differs from greedy in any way that matters: such temperatures are refused.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class Sampling:
    """temperature: 0 = greedy (argmax), else a finite number >= MIN_TEMPERATURE;
    top_k: integer >= 0 (0 disables top-k); top_p: in (0, 1] (1 disables nucleus filtering)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if 0 < t < MIN_TEMPERATURE:
            raise UserError(f"temperature {t!r} is too small to sample with (logits / temperature overflow); "
                            f"use 0 for greedy decoding or a temperature >= {MIN_TEMPERATURE}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise UserError(f"top_k must be an integer >= 0 (0 disables top-k), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or math.isnan(p) or not 0.0 < p <= 1.0:
            raise UserError(f"top_p must be in (0, 1] (1 disables nucleus sampling), got {p!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The warped distribution (..., V) that a sampled token is drawn from (not for greedy)."""
        return logits_to_probs(logits, self.temperature, self.top_k, self.top_p)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        return sample_from(probs, self.generator)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row of logits (..., V) -> LongTensor (...): argmax, or a warped draw."""
        return greedy(logits) if self.is_greedy else self.draw(self.probs(logits))


GREEDY = Sampling()


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Warp logits (..., V) into a distribution (..., V), row by row (arguments validated once,
    by Sampling). In the order nanoGPT / HF-style samplers use:
      1. divide by temperature;
      2. top-k: keep every token whose scaled logit is >= the k-th largest of its row (ties at the
         k-th value all kept: the rule depends on values, never on token order); 0 or >= V = off;
      3. top-p: keep the shortest prefix of the sorted probabilities whose mass is >= top_p (at
         least the top token; ties with the smallest kept probability kept too); 1 = off;
      4. renormalise. Removed tokens get probability exactly 0.
    Computed in float64 for float64 logits, else float32 (bf16/fp16 upcast), and returned so."""
    if temperature <= 0:
        raise ValueError("logits_to_probs needs temperature > 0; for temperature 0 use greedy() "
                         "(argmax) instead of dividing by a tiny number")
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute_dtype) / temperature                    # (..., V)
    V = x.size(-1)

    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]       # (..., 1) k-th largest logit
        x = x.masked_fill(x < kth, float("-inf"))                 # ties with kth survive
    probs = torch.softmax(x, dim=-1)                              # (..., V)

    if top_p < 1.0:
        sorted_p = torch.sort(probs, dim=-1, descending=True).values          # (..., V)
        # Mass strictly before each sorted position; keep a position while that mass < top_p.
        # This keeps the shortest prefix reaching top_p, and always the first (0 < top_p).
        cum = torch.cumsum(sorted_p, dim=-1)                      # (..., V) inclusive
        mass_before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)
        n_keep = (mass_before < top_p).sum(dim=-1, keepdim=True)  # (..., 1), >= 1
        threshold = sorted_p.gather(-1, n_keep - 1)               # (..., 1) smallest kept prob
        probs = probs.masked_fill(probs < threshold, 0.0)         # ties with threshold survive
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs (..., V) -> LongTensor (...); never a zero-probability token."""
    V = probs.size(-1)
    tokens = torch.multinomial(probs.reshape(-1, V), num_samples=1, generator=generator)  # (N, 1)
    return tokens.reshape(probs.shape[:-1])                       # (...)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dim: (..., V) -> LongTensor (...). Exact ties go to the lowest id, so
    every decoder agrees on them; near-ties can flip between kernels in low precision
    (docs/method.md, "Known pitfalls"): exactness is tested in float32/float64."""
    return torch.argmax(logits, dim=-1)

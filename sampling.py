"""
Logit warping and sampling, shared by plain AR decoding and by both views of Orthrus.

Orthrus' sampling mode (PAPER.md, "Verify pass") is speculative rejection sampling, which is
only lossless if the draft distribution used in the acceptance ratio is exactly the one the
draft token was sampled from, and the target distribution is exactly the one plain AR sampling
would use. So the diffusion view (draft) and the AR view (target) both turn logits into
probabilities with `logits_to_probs` below, with the same temperature / top-k / top-p.

Temperature 0 means greedy decoding. It is a separate branch in the callers (`greedy`, an
argmax), never a division by a tiny temperature: `logits_to_probs` refuses temperature 0.
`sample` is a small convenience that holds that branch for callers that only need a token.

Every random draw takes an explicit `torch.Generator` (None = torch's global generator), so a
run is reproducible from its seed and tests never touch global RNG state.
"""
import math

import torch


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError (one line: what is wrong, how to fix it) for unusable sampling args.

    temperature: >= 0, finite; 0 means greedy (argmax).
    top_k:       integer >= 0; 0 disables top-k.
    top_p:       in (0, 1]; 1 disables nucleus filtering.
    """
    if not isinstance(temperature, (int, float)) or math.isnan(temperature) or temperature < 0 \
            or math.isinf(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables top-k), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or math.isnan(top_p) or not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (1 disables nucleus sampling), got {top_p!r}")


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """Warp logits (..., V) into a sampling distribution (..., V); every row is independent.

    Steps, in this order (the order used by nanoGPT / HF-style samplers):
      1. divide by temperature (must be > 0; temperature 0 is the caller's argmax branch);
      2. top-k: keep every token whose scaled logit is >= the k-th largest in its row. Ties at
         the k-th value are all kept, so a row can keep more than k tokens; the rule depends
         only on the values, never on token order. top_k = 0 or top_k >= V disables it;
      3. top-p (nucleus): sort the probabilities descending and keep the shortest prefix whose
         cumulative probability is >= top_p (always at least the top token); tokens tied with
         the smallest kept probability are kept too (same tie rule as top-k). top_p = 1
         disables it;
      4. renormalise over the kept tokens.

    Computed in float64 if `logits` is float64, else in float32 (bf16/fp16 logits are upcast),
    and returned in that dtype. Tokens removed by top-k/top-p get probability exactly 0.
    A row whose logits are all -inf has no distribution (NaN out); callers never produce one.
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
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
    """Draw one token per row of probs (..., V) -> LongTensor (...), with the given generator.

    probs need not be exactly normalised (torch.multinomial normalises), but must be >= 0 with
    a positive sum. A zero-probability token is never drawn.
    """
    V = probs.size(-1)
    flat = probs.reshape(-1, V)                                   # (N, V)
    tokens = torch.multinomial(flat, num_samples=1, generator=generator)  # (N, 1)
    return tokens.reshape(probs.shape[:-1])                       # (...)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the last dim: (..., V) -> LongTensor (...).

    Ties go to the lowest token id (torch.argmax returns the first maximal index), so the AR
    view and any reference decoder agree on exact ties. Near-ties can still flip between
    kernels in low precision (PAPER.md, "Known pitfalls"); test exactness in float32/float64.
    """
    return torch.argmax(logits, dim=-1)


def sample(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (..., V) -> LongTensor (...): argmax if temperature == 0,
    else a draw from logits_to_probs(logits, temperature, top_k, top_p)."""
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return greedy(logits)
    return sample_from(logits_to_probs(logits, temperature, top_k, top_p), generator)

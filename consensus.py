"""
Consensus: the verifier that makes Orthrus lossless (arXiv 2605.12825, Sec. 3.2). Small pure
functions on tensors that know nothing about models, caches or drafters, so they verify any of them.

Conventions (shifted, as in AR models): x_s is pending and the block at positions s..s+K-1 is
[x_s, d_1, .., d_{K-1}]; draft_tokens (K-1,) are d_1..d_{K-1}; p_draft (K-1, V) row j is the law
d_{j+1} was drawn from (after the same warping as the target); p_target (K, V) and target_argmax
(K,) row i are the AR view's for position s+i+1 given [x_s, d_1..d_i] (row K-1: the bonus). Both
verifiers return (n_accepted, next_token): d_1..d_{n_accepted} are committed, then next_token.

Why the output is the AR model's. Greedy: d_{i+1} is kept only if it equals the AR argmax after
the same committed prefix, so by induction every committed token is greedy AR's. Sampling
(Leviathan et al. 2023; Chen et al. 2023): x ~ p_draft is kept with probability
min(1, p_target(x)/p_draft(x)), else a token is drawn from residual = max(0, p_target - p_draft)/Z.
Rejection has probability sum_x max(0, p_draft(x) - p_target(x)) = Z, so
P(emit y) = min(p_draft, p_target)(y) + max(0, p_target(y) - p_draft(y)) = p_target(y); a
rejection ends the cycle, and by the chain rule the committed tokens have the AR sampling law.
In code: u < min(1, p_target/p_draft) with u ~ U[0, 1) always keeps a draft with p_target >=
p_draft (IEEE x/x is exactly 1), so a rejection implies Z > 0, and the residual's fallback to
p_target is reached only when Z is exactly 0 (probability 0), never by a tolerance test.
"""

import torch


def greedy_verify(draft_tokens: torch.Tensor, target_argmax: torch.Tensor) -> tuple[int, int]:
    """Longest prefix of drafts that match the AR argmax, plus the AR argmax after it.

    draft_tokens (K-1,) long, target_argmax (K,) long (see module conventions).
    Returns (n_accepted, bonus_token): n_accepted is the largest n with
    draft_tokens[:n] == target_argmax[:n], and bonus_token = target_argmax[n_accepted].
    One host sync (the final .tolist()), no Python loop over positions.
    """
    if target_argmax.dim() != 1:
        raise ValueError(f"target_argmax must be 1-D (K,), got shape {tuple(target_argmax.shape)}")
    _check_block(draft_tokens, target_argmax.shape, "target_argmax")
    matches = (draft_tokens == target_argmax[:-1]).long()          # (K-1,) 1 where d_{i+1} agrees
    n_accepted = matches.cumprod(dim=0).sum()                      # () length of the all-ones prefix
    bonus = target_argmax.gather(0, n_accepted.view(1))            # (1,) AR argmax after the prefix
    n, token = torch.cat([n_accepted.view(1), bonus]).tolist()    # the single sync
    return n, token


def greedy_verify_tree(draft_tokens: list, parents: list, target_argmax: list) -> tuple[list, int]:
    """Greedy verification of a token tree: the deepest root-to-node path whose every token equals
    the AR argmax after its own ancestors, plus the AR argmax after that path.

    draft_tokens[i], parents[i]: node i's token and its parent node (-1: the root x_s; parents
    come before their children). target_argmax[0] is the AR argmax after the root,
    target_argmax[i + 1] the one after node i (the verify pass saw each node's path only).
    Returns (path, next_token): the accepted nodes from the root down, and the bonus or
    correction. A chain (parents = -1, 0, 1, ...) gives exactly greedy_verify's answer.
    Exact for the same reason as the chain: every accepted token is greedy AR's next token given
    the accepted tokens before it, and at most one child of a node can equal its argmax (siblings
    carry distinct tokens), so the path is unique."""
    children = {}
    for node, parent in enumerate(parents):
        children.setdefault(parent, []).append(node)
    path, node = [], -1
    while True:
        wanted = target_argmax[node + 1]
        match = [c for c in children.get(node, ()) if draft_tokens[c] == wanted]
        if not match:
            return path, wanted
        node = match[0]
        path.append(node)


def acceptance_probability(p_target_x: torch.Tensor, p_draft_x: torch.Tensor) -> torch.Tensor:
    """min(1, p_target_x / p_draft_x), elementwise: the chance of keeping a drafted token x.

    p_draft_x > 0 always holds for a token actually sampled from p_draft (multinomial never
    draws a zero-probability token); callers must not pass drafts outside the draft's support.
    Equal probabilities give exactly 1 (IEEE x / x == 1), so they are always accepted.
    """
    return torch.clamp(p_target_x / p_draft_x, max=1.0)


def residual_distribution(p_target: torch.Tensor, p_draft: torch.Tensor) -> torch.Tensor:
    """Normalised max(0, p_target - p_draft), rowwise over the last dim: (..., V) -> (..., V).

    This is what a rejected position samples from. Where the residual mass is exactly 0
    (p_target <= p_draft everywhere, i.e. equal distributions up to rounding) a rejection
    cannot happen (see the module docstring), and the row returned is p_target: any valid
    distribution would do, and p_target keeps the output a proper distribution.
    """
    residual = torch.clamp(p_target - p_draft, min=0.0)            # (..., V)
    mass = residual.sum(dim=-1, keepdim=True)                      # (..., 1)
    safe_mass = torch.where(mass > 0, mass, torch.ones_like(mass))
    return torch.where(mass > 0, residual / safe_mass, p_target)


def speculative_verify(draft_tokens: torch.Tensor, p_draft: torch.Tensor, p_target: torch.Tensor,
                       generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative rejection sampling over one block; the output follows p_target exactly.

    draft_tokens (K-1,) long, p_draft (K-1, V), p_target (K, V) (see module conventions).
    Returns (n_accepted, next_token): drafts d_1..d_n are kept while u_i < min(1, p_target[i, d]
    / p_draft[i, d]) with u_i ~ U[0, 1); at the first rejection i, next_token ~
    residual_distribution(p_target[i], p_draft[i]); if all K-1 are kept, next_token ~
    p_target[K-1] (the bonus). K-1 = 0 works (next_token ~ p_target[0]).

    The generator must live on p_target's device. It is always consumed the same way (K-1 uniforms, then one multinomial draw),
    whatever is accepted. All K-1 residuals are computed up front (cost O(K V), small next to
    a forward pass) so that picking the row needs no host sync: one sync at the end.
    """
    if p_target.dim() != 2:
        raise ValueError(f"p_target must be 2-D (K, V), got shape {tuple(p_target.shape)}")
    _check_block(draft_tokens, p_target.shape, "p_target")
    if p_draft.shape != (draft_tokens.shape[0], p_target.shape[1]):
        raise ValueError(f"p_draft must have shape (K-1, V) = ({draft_tokens.shape[0]}, "
                         f"{p_target.shape[1]}), got {tuple(p_draft.shape)}")
    n_draft = draft_tokens.shape[0]
    u = torch.rand(n_draft, generator=generator, dtype=p_target.dtype,
                   device=p_target.device)                                        # (K-1,)
    p_target_x = p_target[:-1].gather(1, draft_tokens.view(-1, 1)).squeeze(1)   # (K-1,)
    p_draft_x = p_draft.gather(1, draft_tokens.view(-1, 1)).squeeze(1)           # (K-1,)
    accepted = (u < acceptance_probability(p_target_x, p_draft_x)).long()       # (K-1,)
    n_accepted = accepted.cumprod(dim=0).sum()                                   # ()

    # Row i < K-1: where to sample if rejected at i; row K-1: the bonus after full acceptance.
    next_dists = torch.cat([residual_distribution(p_target[:-1], p_draft), p_target[-1:]])  # (K, V)
    next_dist = next_dists.index_select(0, n_accepted.view(1))                   # (1, V)
    next_token = torch.multinomial(next_dist, num_samples=1, generator=generator).view(1)
    n, token = torch.cat([n_accepted.view(1), next_token]).tolist()              # the single sync
    return n, token


def acceptance_histogram(accepted_counts: list[int], max_drafts: int) -> list[int]:
    """Count cycles by number of accepted drafts: hist[n] = #cycles with n_accepted == n,
    for n in 0..max_drafts (= K-1). Mean accepted length is sum(n * hist[n]) / sum(hist)."""
    hist = [0] * (max_drafts + 1)
    for n in accepted_counts:
        if not 0 <= n <= max_drafts:
            raise ValueError(f"accepted count {n} is outside 0..{max_drafts}; pass max_drafts = K-1")
        hist[n] += 1
    return hist


def _check_block(draft_tokens: torch.Tensor, target_rows: torch.Size, name: str) -> None:
    """Shape checks shared by both verifiers (Python-side only, no host sync)."""
    if draft_tokens.dim() != 1:
        raise ValueError(f"draft_tokens must be 1-D (K-1,), got shape {tuple(draft_tokens.shape)}")
    if target_rows[0] != draft_tokens.shape[0] + 1:
        raise ValueError(f"{name} must have K = len(draft_tokens) + 1 = {draft_tokens.shape[0] + 1} "
                         f"rows, got shape {tuple(target_rows)}")

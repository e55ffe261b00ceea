"""
Two levers for more tokens per forward pass, beyond the paper (docs/tokens-per-pass.md). Both ride
on the one decode loop of orthrus.py and leave its output exactly AR's.

Token trees (TreeDrafter, greedy only). The draft pass gives a distribution at every block
position; best_first_tree grows a tree from each position's top `width` tokens, most probable paths
first, and the AR view verifies the whole tree in ONE pass (model.tree_layout: each node at
position s + depth, seeing only its own path), accepts the deepest agreeing path
(consensus.greedy_verify_tree) and keeps only that path's K/V (KVCache.keep). Sampling keeps the
chain: an exact multi-candidate rule (recursive rejection over siblings) is not built here.

One forward per cycle (FusedDiffusionDrafter). The verify pass of block n also drafts block n+1
for the likely acceptances (verify_and_draft), so when the acceptance was foreseen the next
cycle's drafts cost no pass of their own. Its blocks open with MASK where the bonus token will
stand: heads learn that layout with train.py --mask-first.
"""

import heapq

import torch
import torch.nn.functional as F

from diffusion_head import DRAFT_LEN, DiffusionHead, prefix_and_block_attention
from errors import UserError
from model import GPT, offset_causal_mask
from orthrus import DiffusionDrafter, Proposal
from sampling import Sampling, greedy


# ---------------------------------------------------------------------------------------------
# Token trees


class TreeDrafter(DiffusionDrafter):
    """The diffusion view's one draft pass, proposed as a token tree (best_first_tree) of at most
    `nodes` nodes, `width` candidates per position, for the loop to verify in one pass. Greedy
    only: under sampling it drafts the plain chain (see the module docstring)."""

    name = "orthrus-tree"

    def __init__(self, base: GPT, head: DiffusionHead, draft_len: int = DRAFT_LEN, nodes: int = 31, width: int = 4):
        super().__init__(base, head, draft_len)
        if nodes < 1 or width < 1:
            raise UserError(f"a token tree needs --tree-nodes >= 1 and --tree-width >= 1, got {nodes} and {width}")
        self.max_tree_nodes, self.width = nodes, width  # the loop sizes the cache for max_tree_nodes

    @torch.no_grad()
    def propose(self, cache, sequence: list, n: int, sampling: Sampling) -> Proposal:
        if not sampling.is_greedy:
            return super().propose(cache, sequence, n, sampling)
        block = torch.full((1, n + 1), self.head.mask_id, dtype=torch.long, device=cache.k.device)
        block[0, 0] = sequence[-1]  # [x_s, MASK x n] at positions s..s+n
        logits = self.head.draft_logits(self.base, cache, block)[0, :n]  # row j: position s+j+1
        tokens, parents = best_first_tree(torch.softmax(logits.float(), -1), self.max_tree_nodes, self.width)
        return Proposal(torch.tensor(tokens, device=block.device), None, 1, parents)


def best_first_tree(probs: torch.Tensor, n_nodes: int, width: int) -> tuple[list, list]:
    """A token tree from one draft pass: probs (n, V) are the head's distributions for positions
    s+1..s+n. Candidates at depth j are the `width` most likely tokens of row j-1, and a node's
    score is the product of the probabilities on its path. The n_nodes highest-scoring nodes are
    taken best first (a node's score never exceeds its parent's, so every taken node's parent was
    taken before it). Greedy decoding only: sampled drafting keeps the chain, whose exact
    acceptance rule is the one in consensus.py. Returns (tokens, parents), parents[i] = -1 for x_s."""
    top_p, top_t = probs.topk(min(width, probs.size(-1)), dim=-1)  # (n, width), best first
    top_p, top_t = top_p.tolist(), top_t.tolist()
    tokens, parents = [], []
    frontier = [(-top_p[0][0], -1, 0, 0, 1.0)]  # (-score, parent node, depth - 1, rank, parent's score)
    while frontier and len(tokens) < n_nodes:
        negative_score, parent, d, rank, parent_score = heapq.heappop(frontier)
        node, score = len(tokens), -negative_score
        tokens.append(top_t[d][rank])
        parents.append(parent)
        if rank + 1 < len(top_p[d]):  # its next sibling
            heapq.heappush(frontier, (-parent_score * top_p[d][rank + 1], parent, d, rank + 1, parent_score))
        if d + 1 < len(top_p):  # its best child
            heapq.heappush(frontier, (-score * top_p[d + 1][0], node, d + 1, 0, score))
    return tokens, parents


# ---------------------------------------------------------------------------------------------
# One forward per cycle


class FusedDiffusionDrafter(DiffusionDrafter):
    """One forward per cycle: the verify pass of block n also drafts block n+1, for each acceptance
    j in `foresee` (and "all accepted"), as [MASK x K] blocks that start where the bonus will stand
    (verify_and_draft). When the actual acceptance was foreseen, the next cycle's
    drafts cost no pass of their own; otherwise a separate draft pass runs as usual. Exactness is
    untouched: the AR view still verifies every token, and a prepared block's distribution depends
    on committed tokens only, so speculative sampling stays exact with it as p_draft."""

    name = "orthrus-fused"

    def __init__(self, base: GPT, head: DiffusionHead, draft_len: int = DRAFT_LEN, foresee=(0, 1, 2)):
        super().__init__(base, head, draft_len)
        self.foresee = sorted(set(foresee))
        self.prepared = {}  # position of the next pending token -> its block's normed hidden states (K, n_embd)

    def verify(self, cache, block: torch.Tensor) -> torch.Tensor:
        s, n, K = cache.length, block.size(1) - 1, self.max_drafts + 1
        # blocks that would run past the model's context are not prepared
        starts = [j for j in sorted({j for j in self.foresee if j < n} | {n}) if s + j + K < self.base.config.context_len]
        if not starts:
            self.prepared = {}
            return self.base(block, cache, logits="all")[0]
        ar_logits, draft_hidden = verify_and_draft(self.head, self.base, cache, block, starts, K)
        self.prepared = {s + 1 + j: hidden for j, hidden in zip(starts, draft_hidden)}
        return ar_logits

    @torch.no_grad()
    def propose(self, cache, sequence: list, n: int, sampling: Sampling) -> Proposal:
        hidden = self.prepared.pop(cache.length, None)
        self.prepared = {}
        if hidden is None:  # this acceptance was not foreseen: an ordinary draft pass
            return super().propose(cache, sequence, n, sampling)
        logits = self.base.lm_head(hidden[:n])  # row i drafts position s+i+1, s = the pending token's position
        if sampling.is_greedy:
            return Proposal(greedy(logits), None, 0)
        p_draft = sampling.probs(logits)
        return Proposal(sampling.draw(p_draft), p_draft, 0)

    def start(self, prompt: list, capacity: int) -> None:
        self.prepared = {}


def verify_and_draft(head: DiffusionHead, base: GPT, cache, block: torch.Tensor, starts: list, draft_len: int):
    """One forward for a whole cycle: the AR view verifies `block` (1, T) = [x_s, d_1..d_n] at
    positions s..s+n, writing its K/V to the cache as `base(block, cache)` would, and in the same
    pass the diffusion view drafts the NEXT block for every foreseen acceptance j in `starts`:
    [MASK x K] at positions s+j+1..s+j+K, which sees the cache, the AR view's fresh K/V of
    x_s, d_1..d_j (exactly what stays committed if j drafts are accepted) and its own block.
    Position s+j+1 will hold the AR view's bonus token, unknown while the pass runs, hence the
    MASK there (train.py --mask-first teaches this layout). Both views share the MLPs, so the
    rows of both go through each MLP together.
    Returns (AR logits (T, V), draft hidden states (len(starts), K, n_embd) after the final norm:
    the LM head is applied later, to the one block and the rows actually used); draft row i of
    block j drafts position s+j+i+2, i.e. index i of the next cycle's block [bonus, MASK x (K-1)]."""
    B, T = block.shape
    s, K, M = cache.length, draft_len, len(starts)
    device = block.device
    ar_pos = torch.arange(s, s + T, device=device)
    draft_pos = torch.cat([torch.arange(s + j + 1, s + j + 1 + K, device=device) for j in starts])  # (M*K,)
    x_ar = base.embed_tokens(block)  # (1, T, n_embd)
    x_draft = head.mask_embedding.to(x_ar.dtype).expand(B, M * K, -1)  # (1, M*K, n_embd)
    ar_mask = offset_causal_mask(s, T, device)  # (T, s+T)
    for i, layer in enumerate(base.layers):
        q, k, v = layer.self_attn.project(layer.input_layernorm(x_ar), base.rope_cos[ar_pos], base.rope_sin[ar_pos])
        k_all, v_all = cache.write(i, k, v)  # (1, Hkv, s+T, D): the cache with this block appended
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=ar_mask, enable_gqa=True)  # (1, H, T, D)
        x_ar = x_ar + layer.self_attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        attn = head.attn[i]
        qd, kd, vd = attn.project(layer.input_layernorm(x_draft), base.rope_cos[draft_pos], base.rope_sin[draft_pos])
        # block b: the cache and fresh AR keys of [0, s + j_b + 1) (views, no copy), then its own K keys
        y = torch.cat([prefix_and_block_attention(qd[:, :, b * K:(b + 1) * K], k_all[:, :, : s + j + 1],
                                                  v_all[:, :, : s + j + 1], kd[:, :, b * K:(b + 1) * K],
                                                  vd[:, :, b * K:(b + 1) * K])
                       for b, j in enumerate(starts)], dim=2)  # (1, H, M*K, D)
        x_draft = x_draft + attn.o_proj(y.transpose(1, 2).reshape(B, M * K, -1))
        x_ar, x_draft = layer.feed_forward(torch.cat([x_ar, x_draft], 1)).split([T, M * K], 1)
    cache.length += T  # as base(block, cache) would
    return base.lm_head(base.norm(x_ar))[0], base.norm(x_draft)[0].view(M, K, -1)

"""The estimator counts what the training path does: keys per block query of the grouped attention."""

import pytest
import torch

from benchmarks import estimate
from training.anchors import choose_anchors
from training.attention import attention_calls, default_blocks_per_call


@pytest.mark.parametrize("T, K, N", [(512, 16, 32), (1024, 16, 64), (2048, 32, 256), (256, 16, 8)])
def test_estimated_keys_per_query_match_the_grouped_calls(T, K, N):
    """Mean over block queries of (prefix + the group's block tokens), from attention_calls with
    random anchors as training draws them, against estimate.attention_groups: within 3%."""
    g = torch.Generator().manual_seed(0)
    measured = []
    for _ in range(20):
        anchors = choose_anchors(T, K, "random", g, N)
        calls = attention_calls(anchors, T, K, default_blocks_per_call(T, K))
        queries = sum(size for size, _, _ in calls)
        measured.append(sum(size * (prefix + size) for size, prefix, _ in calls) / queries)
    n_groups, keys = estimate.attention_groups(T, K, N)
    assert n_groups == len(calls)
    assert abs(sum(measured) / len(measured) - keys) / keys < 0.03

"""Tests for behaviour that mutation testing (mutation/) found unchecked: each kills mutants that every
other test let survive."""
from __future__ import annotations

import pytest
import torch
from conftest import images, tiny_timm

import tokenprune
from tokenprune import ops


@pytest.mark.parametrize("pool", ["max", "avgmax", "avg"])
def test_timm_pools_count_merged_tokens_by_size(pool):
    """'avg' is the size-weighted mean; 'max' is unchanged by merging (a merged token is an average);
    'avgmax' is half of each."""
    model, x = tiny_timm("vit_base_patch16_siglip_gap_224", global_pool=pool), images()
    tokenprune.apply(model, "tome", keep=0.25)
    with torch.inference_mode():
        logits = model(x)
        size = tokenprune.last_forward(model).size
        feats = model.forward_features(x)
    mean, peak = ops.size_weighted_mean(feats, size), feats.amax(dim=1)
    pooled = {"avg": mean, "max": peak, "avgmax": 0.5 * (mean + peak)}[pool]
    torch.testing.assert_close(logits, model.head(model.fc_norm(pooled)))

"""The one budget -> (kv_lora_rank, qk_rope_head_dim) rule, as convert, the split search, streaming and
rank allocation all use it."""

import pytest

from latentkv import ExactConfig, LowRankConfig, SVDConfig
from latentkv.conversion import dims
from latentkv.errors import LatentKVError
from latentkv.families import source_layout

from conftest import make_tiny


@pytest.fixture(scope="module")
def layout():
    return source_layout(make_tiny("llama-gqa").config)  # G = 2 KV heads of d = 16: 64 values per token


def test_fixed_dims_by_method(layout):
    assert dims.fixed_dims(ExactConfig(), layout) == (32, 32)
    r, p = dims.fixed_dims(SVDConfig(kv_budget=0.5), layout)
    assert r + p == 32 and p % (2 * layout.num_kv_heads) == 0  # S_high keeps pairs per KV head
    assert dims.fixed_dims(LowRankConfig(kv_lora_rank=10, qk_rope_head_dim=6), layout) == (10, 6)
    assert dims.fixed_dims(LowRankConfig(kv_budget=0.5), layout) is None  # the split search decides


@pytest.mark.parametrize("rope", ["high", "rorope", "rorope-export"])
def test_candidates_fit_the_budget_and_the_grid(layout, rope):
    step, most = dims.rope_grid(layout, rope)
    for r, p in dims.candidate_splits(layout, rope, 32):
        assert r + p <= 32 and p % step == 0 and 0 < p <= most
        dims.check_dims(layout, r, p, rope)  # every candidate is a legal conversion


def test_streaming_takes_one_of_the_searched_splits(layout):
    config = LowRankConfig(kv_budget=0.5)
    assert dims.stream_dims(layout, config) in dims.candidate_splits(layout, config.rope, 32)
    assert dims.stream_dims(layout, SVDConfig(kv_budget=0.5)) == dims.fixed_dims(SVDConfig(kv_budget=0.5), layout)


def test_the_latent_cap_is_the_rank_of_keys_and_values(layout):
    # one shared nope group: (G*d - p) key rows + G*d value rows, capped by the hidden size D = 64
    assert dims.latent_cap(layout, "rorope", 8) == min(32 - 8 + 32, 64)
    with pytest.raises(LatentKVError, match="--kv-lora-rank 60 does not fit"):
        dims.check_dims(layout, 60, 8, "rorope")
    with pytest.raises(LatentKVError, match="multiple of 2\\*num_key_value_heads"):
        dims.check_dims(layout, 8, 6, "high")

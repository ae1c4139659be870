"""EliteKV's RoPElite (`--rope elite`): its pair scores against RoPE computed directly, the greedy
step against brute force, the memo, and the conversion it feeds (the method matrix in test_lowrank
also runs it: full budget exact, cache == budget, error falls with budget)."""

import pytest
import torch

from latentkv import convert, record_of
from latentkv.conversion.configs import LowRankConfig
from latentkv.conversion.rope import ROPE_STRATEGIES, greedy_pairs, head_activations, pair_scores
from latentkv.conversion.statistics import collect_stats
from latentkv.errors import LatentKVError
from latentkv.families import attention_layers, read_attention, source_layout
from latentkv.runtime.kernels import rotate_half

from conftest import make_tiny


def _setup(name="llama-gqa", windows=3, t=32):
    model = make_tiny(name)
    torch.manual_seed(0)
    stats = collect_stats(model, torch.randint(0, 320, (windows, t)), progress=False, keep=windows)
    lay = source_layout(model.config)
    return model, lay, read_attention(attention_layers(model)[1]).at_least_float32(), stats[1]


def _rope(x, lay, keep_pairs=None, horizon=0):
    """x (..., T, d) rotated by its position, as transformers does; pairs outside `keep_pairs` get the
    mean rotation over `horizon` distances instead (what a converted query carries)."""
    from latentkv.conversion.rope import expected_rotation

    half, T = lay.head_dim // 2, x.shape[-2]
    theta = torch.tensor(lay.inv_freq, dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta
    if keep_pairs is not None:
        c, s = expected_rotation(lay, horizon)
        mean = torch.atan2(s, c)
        fixed = torch.tensor([i not in keep_pairs for i in range(half)])
        ang = torch.where(fixed, mean, ang) if horizon > 1 else torch.where(fixed, 0.0, ang)
        scale = torch.where(fixed, (c ** 2 + s ** 2).sqrt(), 1.0) if horizon > 1 else torch.ones(half, dtype=theta.dtype)
    else:
        scale = torch.ones(half, dtype=theta.dtype)
    ang = torch.cat((ang, ang), -1).float()
    scale = torch.cat((scale, scale)).float()
    return (x * ang.cos() + rotate_half(x) * ang.sin()) * scale


@pytest.mark.parametrize("horizon", [0, 16])
def test_pair_scores_sum_to_rope_scores(horizon):
    _, lay, src, stats = _setup()
    q, k, _ = head_activations(src, lay, stats.sample)
    rows = torch.arange(3, 32, 4)
    rot, flat = pair_scores(q[:, :2], k[:, 0], lay, horizon, rows)
    want_rot = _rope(q[:, :2], lay)[:, :, rows] @ _rope(k[:, 0], lay)[:, None].transpose(-1, -2)
    want_flat = _rope(q[:, :2], lay, keep_pairs=(), horizon=horizon)[:, :, rows] @ k[:, 0, None].transpose(-1, -2)
    assert torch.allclose(rot.sum(0), want_rot, atol=1e-4)
    assert torch.allclose(flat.sum(0), want_flat, atol=1e-4)


def test_greedy_first_pair_is_the_brute_force_best():
    """The first greedy pick minimises the attention-output error over every single pair, measured here
    with the rotation applied directly."""
    _, lay, src, stats = _setup()
    q, k, v = head_activations(src, lay, stats.sample)
    heads, T, stride = slice(0, lay.group_size), k.shape[2], 1
    hidden = torch.ones(T, T, dtype=torch.bool).triu(1)

    def output(qr, kr):
        s = (qr @ kr[:, None].transpose(-1, -2) * src.softmax_scale).masked_fill(hidden, float("-inf"))
        return torch.softmax(s, -1) @ v[:, 0, None]

    want = output(_rope(q[:, heads], lay), _rope(k[:, 0], lay))
    errors = [(output(_rope(q[:, heads], lay, {i}, 16), _key_only(k[:, 0], lay, {i})) - want).pow(2).sum()
              for i in range(lay.head_dim // 2)]
    order = []
    greedy_pairs(order, 1, q[:, heads], k[:, 0], v[:, 0], lay, 16, src.softmax_scale, stride)
    assert order == [int(torch.stack(errors).argmin())]


def _key_only(k, lay, keep_pairs):
    """The key rotated only on `keep_pairs` (the rest stays at position 0's angle: no rotation)."""
    half, T = lay.head_dim // 2, k.shape[-2]
    theta = torch.tensor(lay.inv_freq, dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * theta
    ang = torch.where(torch.tensor([i in keep_pairs for i in range(half)]), ang, 0.0)
    ang = torch.cat((ang, ang), -1).float()
    return k * ang.cos() + rotate_half(k) * ang.sin()


def test_memo_extends_the_greedy_order():
    """n pairs are the first n of the n + 1 order, so the split search's candidates reuse one greedy run."""
    _, lay, src, stats = _setup()
    elite = ROPE_STRATEGIES["elite"]
    memo = {}
    two = elite.split(src, lay, 4, sample=stats.sample, memo=memo)
    orders = {g: list(memo[("elite", g, 0)]) for g in range(lay.num_kv_heads)}
    three = elite.split(src, lay, 6, sample=stats.sample, memo=memo)
    assert two.uniform(lay) and three.uniform(lay)
    for g in range(lay.num_kv_heads):
        assert memo[("elite", g, 0)][:2] == orders[g]
        assert {i for j, i in two.kept if j == g} < {i for j, i in three.kept if j == g}
    fresh = elite.split(src, lay, 6, sample=stats.sample, memo={})
    assert fresh == three


def test_needs_calibration_activations():
    _, lay, src, _ = _setup()
    with pytest.raises(LatentKVError, match="calibration activations"):
        ROPE_STRATEGIES["elite"].split(src, lay, 4)
    with pytest.raises(ValueError, match="multiple of 2 KV heads"):
        ROPE_STRATEGIES["elite"].split(src, lay, 3, sample=torch.zeros(1, 4, lay.hidden_size))


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-qknorm", "olmo2-qknorm"])
def test_elite_budget_conversion_through_the_split_search(name):
    """Every candidate split is an elite one and the record names it; QK-norm keys are scored normalised
    (per head for Qwen3, over the projection for OLMo-2)."""
    model = make_tiny(name)
    torch.manual_seed(1)
    calib = torch.randint(0, 320, (10, 32))
    rec = record_of(convert(model, LowRankConfig(kv_budget=0.5, rope="elite"), calib_ids=calib, progress=False))
    assert rec["conversion"]["rope"] == "elite"
    assert {c["rope"] for c in rec["split_search"]["candidates"]} == {"elite"}
    assert all(c["heldout_nll"] < 7 for c in rec["split_search"]["candidates"])  # log(320) = 5.8: no blow-up

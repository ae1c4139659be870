"""Per-layer rank allocation and frequency folding on tiny models."""

import pytest
import torch

from latentkv import LatentCache, convert, load, record_of, save
from latentkv.conversion.allocate import allocate_ranks, protected_plan, tail_share
from latentkv.conversion.calibration import oneshot_stats
from latentkv.conversion.configs import LowRankConfig
from latentkv.conversion.rope import RoRoPE, mixed_key_weights, row_energy
from latentkv.conversion.surgery import convert_oneshot
from latentkv.errors import LatentKVError
from latentkv.families import attention_layers, read_attention, source_layout

from conftest import make_tiny


@pytest.fixture(scope="module")
def calib_ids():
    torch.manual_seed(3)
    return torch.randint(0, 320, (10, 32))


def _spectra(seed=0, layers=5, m=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(m, generator=g).sort(descending=True).values * 10 ** float(torch.rand(1, generator=g) * 3)
            for _ in range(layers)]


def _tail(spectra, ranks):
    return sum(float((s[r:] ** 2).sum()) for s, r in zip(spectra, ranks))


@pytest.mark.parametrize("seed", range(5))
def test_greedy_allocation_minimises_summed_error(seed):
    spectra = _spectra(seed)
    total = 6 * len(spectra)
    ranks = allocate_ranks(spectra, total, floor=2)
    assert sum(ranks) == total and min(ranks) >= 2 and max(ranks) <= 12
    best = _tail(spectra, ranks)
    assert best <= _tail(spectra, [6] * len(spectra)) + 1e-12
    g = torch.Generator().manual_seed(seed)
    for _ in range(50):  # any other split of the same total (within the bounds) leaves at least as much error
        other = [2] * len(spectra)
        for i in torch.randint(0, len(spectra), (total - 2 * len(spectra),), generator=g).tolist():
            other[i] += 1
        if max(other) <= 12:
            assert best <= _tail(spectra, other) + 1e-12


def test_allocation_bounds_and_shares():
    spectra = _spectra(1)
    with pytest.raises(LatentKVError, match="cannot spread"):
        allocate_ranks(spectra, 100 * len(spectra))
    with pytest.raises(LatentKVError, match="cannot spread"):
        allocate_ranks(spectra, 3, floor=1)
    s = spectra[0]
    assert tail_share(s, 0) == pytest.approx(1.0) and tail_share(s, s.numel()) == 0.0
    with pytest.raises(LatentKVError, match="rank-allocation"):
        LowRankConfig(kv_budget=0.5, rank_allocation="error")


def test_allocated_conversion_keeps_the_budget_and_round_trips(calib_ids, tiny_tokenizer, tmp_path):
    model = make_tiny("llama-gqa", layers=3)
    layout = source_layout(model.config)
    conv = convert(model, LowRankConfig(kv_lora_rank=12, qk_rope_head_dim=8, rank_allocation="sensitivity"),
                   calib_ids=calib_ids, progress=False)
    alloc = record_of(conv)["split_search"]["allocation"]
    assert sum(k + p for k, p in alloc["dims"]) == 20 * layout.num_layers  # the total budget, kept exact or spread
    assert len(alloc["layer_score_cost"]) == layout.num_layers and alloc["candidates"][0]["protected"] == []
    fair = [c["score"] for c in alloc["candidates"]  # never bought with held-out NLL
            if c["heldout_nll"] <= alloc["heldout_nll_uniform"] and c["score"] < alloc["heldout_score_uniform"]]
    assert (alloc["used"] == "allocated") == bool(fair)
    assert not fair or alloc["heldout_score_allocated"] == min(fair)
    ranks = [layer.self_attn.dims.kv_lora_rank for layer in conv.model.layers]
    assert ranks == [r for r, _ in alloc["dims"]]
    x = torch.randint(0, 320, (2, 20))
    cache = LatentCache(conv)
    with torch.no_grad():
        logits = conv(x, cache=cache, use_cache=True).logits
    assert cache.nbytes() == (12 + 8) * layout.num_layers * 4 * x.numel()  # the total budget, whatever the spread
    save(conv, tiny_tokenizer, tmp_path / "m")
    back, _ = load(tmp_path / "m")
    assert [layer.self_attn.dims.kv_lora_rank for layer in back.model.layers] == ranks
    with torch.no_grad():
        assert torch.allclose(back(x).logits, logits, atol=1e-5)


def test_sensitivity_is_the_cost_of_one_converted_layer(calib_ids):
    from latentkv.conversion.allocate import layer_sensitivity
    from latentkv.conversion.calibration import held_out_score, split_ids
    from latentkv.conversion.statistics import collect_stats
    from latentkv.conversion.surgery import convert_layer

    model = make_tiny("llama-gqa", layers=2)
    layout = source_layout(model.config)
    config = LowRankConfig(kv_lora_rank=6, qk_rope_head_dim=4)
    fit, held = split_ids(calib_ids)
    stats = collect_stats(model, fit, progress=False)
    cost = layer_sensitivity(model, layout, config, (6, 4), stats, held)
    import copy

    one = copy.deepcopy(model)
    convert_layer(model, one, 1, layout, config, (6, 4), stats[1])
    score = lambda m: held_out_score(m, held)["score"]  # noqa: E731
    assert cost[1] == pytest.approx(score(one) - score(model), abs=1e-6)
    assert all(type(a.self_attn).__name__ != "MLAAttention" for a in model.model.layers)  # source untouched


def test_folding_concentrates_key_energy(calib_ids):
    """Ky Fan: a PCA over two neighbouring frequencies puts at least as much key energy into its top n
    channels as any n channels of the per-frequency PCA of the same band."""
    from latentkv.conversion.statistics import collect_stats

    model = make_tiny("llama-mha")
    layout = source_layout(model.config)
    src = read_attention(attention_layers(model)[0])
    sigma = collect_stats(model, calib_ids, progress=False)[0].sigma
    G, half = layout.num_kv_heads, layout.head_dim // 2
    energy = {}
    for fold in (1, 2):
        mix = RoRoPE.rotation(src, layout, sigma, fold)
        e = row_energy(mixed_key_weights(src, layout, mix).reshape(G * layout.head_dim, -1), sigma)
        energy[fold] = e.view(G, 2, half).sum(1)  # (G, d/2) per channel
    for band in range(0, half, 2):
        e1 = energy[1][:, band:band + 2].flatten().sort(descending=True).values
        e2 = energy[2][:, band:band + 2].flatten().sort(descending=True).values
        assert torch.all(e2.cumsum(0) >= e1.cumsum(0) - 1e-9 * e1.sum())
        assert e2.sum() == pytest.approx(float(e1.sum()), rel=1e-9)  # orthogonal: total energy unchanged


def test_protected_layers_are_exact_and_the_rest_pays(calib_ids):
    model = make_tiny("llama-gqa", layers=3)
    layout = source_layout(model.config)
    config = LowRankConfig(kv_lora_rank=32, qk_rope_head_dim=8)  # 40 of the source's 64 values per token
    full = layout.num_kv_heads * layout.head_dim
    spectra = [torch.linspace(4, 1, 56).double()] * 3
    plan = protected_plan(layout, config, (32, 8), spectra, [0.1, 0.5, 0.2], 1)
    assert plan[1] == (full, full) and sum(k + p for k, p in plan) == 40 * 3 and plan[0][1] == plan[2][1] == 8
    assert protected_plan(layout, config, (32, 8), spectra, [0.1, 0.5, 0.2], 2) is None  # the rest cannot pay
    even = protected_plan(layout, config, (32, 8), spectra, [0.1, 0.5, 0.2], 1, spread=False)
    assert even == [(20, 8), (full, full), (20, 8)]  # (40 x 3 - 2 x 32 - 2 x 8) / 2 latent dims each
    exact = convert_oneshot(model, layout, config, [(full, full)] * 3, oneshot_stats(model, calib_ids))
    x = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        assert torch.allclose(exact(x).logits, model(x).logits, atol=1e-4)


def test_spectrum_allocation_water_fills_the_weighted_spectra(calib_ids):
    """CARE-style: the uniform split's total rank goes to the largest marginal errors of the layers' own
    weighted spectra (no held-out measurement); the cache keeps the budget."""
    from latentkv.conversion.allocate import layer_spectra

    model = make_tiny("llama-gqa", layers=3)
    layout = source_layout(model.config)
    cfg = LowRankConfig(kv_lora_rank=12, qk_rope_head_dim=8, rank_allocation="spectrum")
    conv = convert(model, cfg, calib_ids=calib_ids, progress=False)
    alloc = record_of(conv)["split_search"]["allocation"]
    assert alloc["used"] == "spectrum" and sum(alloc["ranks"]) == 12 * layout.num_layers
    stats = oneshot_stats(model, calib_ids, attention=True)
    spectra = layer_spectra(model, layout, cfg, 8, stats)
    assert _tail(spectra, alloc["ranks"]) <= _tail(spectra, [12] * layout.num_layers) + 1e-9
    assert [layer.self_attn.dims.kv_lora_rank for layer in conv.model.layers] == alloc["ranks"]

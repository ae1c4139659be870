"""The output refit: o_proj refit by least squares to the source's attention output, walked side by side."""

from __future__ import annotations

import pytest
import torch

from latentkv import convert, record_of
from latentkv.conversion.configs import LowRankConfig
from latentkv.conversion.output_refit import SETTLED, relative_error, solve

from conftest import make_tiny


@pytest.fixture(scope="module")
def calib_ids():
    torch.manual_seed(5)
    return torch.randint(0, 320, (12, 96))  # 7 fit + 5 held-out windows: 672 tokens, >= 4 per o_proj column


def moments(a: torch.Tensor, b: torch.Tensor):
    """a (M, k) source inputs, b (M, k') converted ones -> (C, G, auto) as `layer_moments` sums them."""
    a1 = torch.cat((a, torch.ones(a.shape[0], 1, dtype=a.dtype)), 1)
    return a1.T @ b, b.T @ b, a1.T @ a1


def test_solve_is_least_squares_with_the_bias_difference():
    torch.manual_seed(0)
    m, k, kp, d = 400, 6, 5, 4
    a, b = torch.randn(m, k, dtype=torch.float64), torch.randn(m, kp, dtype=torch.float64)
    w, delta = torch.randn(d, k, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    w_src = torch.cat((w, delta[:, None]), 1)
    cross, gram, auto = moments(a, b)
    got = solve(w_src, torch.zeros(d, kp, dtype=torch.float64), cross, gram, ridge=1e-12)
    want = torch.linalg.lstsq(b, a @ w.T + delta).solution.T  # (d, kp)
    assert torch.allclose(got, want, atol=1e-8), (got - want).abs().max()
    old = torch.randn(d, kp, dtype=torch.float64)
    assert relative_error(got, w_src, cross, gram, auto) < relative_error(old, w_src, cross, gram, auto)
    direct = ((b @ got.T - a @ w.T - delta) ** 2).sum() / ((a @ w.T + delta) ** 2).sum()
    assert relative_error(got, w_src, cross, gram, auto) == pytest.approx(float(direct), rel=1e-6)


def test_solve_keeps_the_weight_where_both_streams_agree():
    torch.manual_seed(1)
    a = torch.randn(300, 8, dtype=torch.float64)
    w = torch.randn(5, 8, dtype=torch.float64)
    cross, gram, _ = moments(a, a)
    got = solve(torch.cat((w, torch.zeros(5, 1, dtype=torch.float64)), 1), w, cross, gram, ridge=1e-3)
    assert torch.allclose(got, w, atol=1e-10)


def test_ridge_pulls_towards_the_converted_weight():
    torch.manual_seed(2)
    a, b = torch.randn(50, 6, dtype=torch.float64), torch.randn(50, 6, dtype=torch.float64)
    w, old = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    cross, gram, _ = moments(a, b)
    w_src = torch.cat((w, torch.zeros(3, 1, dtype=torch.float64)), 1)
    assert torch.allclose(solve(w_src, old, cross, gram, ridge=1e6), old, atol=1e-4)


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias", "gemma3-qknorm"])
def test_refit_lowers_every_layers_output_error_and_is_recorded(family, calib_ids):
    model = make_tiny(family)
    base = dict(kv_lora_rank=8, qk_rope_head_dim=4, attn_temperature=1.0, head_temperatures=False,
                rope="2norm" if family == "gemma3-qknorm" else "rorope")
    off = convert(model, LowRankConfig(**base, output_refit=False), calib_ids=calib_ids, progress=False)
    on = convert(model, LowRankConfig(**base, output_refit=True), calib_ids=calib_ids, progress=False)
    entry = record_of(on)["split_search"]["output_refit"]
    assert entry["windows"] == 7 and entry["seq_len"] == calib_ids.shape[1]
    assert all(after < before for before, after in zip(entry["error_before"], entry["error_after"])), entry
    assert "output_refit" not in (record_of(off).get("split_search") or {})
    changed = [not torch.equal(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight)
               for a, b in zip(on.model.layers, off.model.layers)]
    same_latent = [torch.equal(a.self_attn.kv_b_proj.weight, b.self_attn.kv_b_proj.weight)
                   for a, b in zip(on.model.layers, off.model.layers)]
    assert all(changed) and all(same_latent)


def test_refit_keeps_a_full_rank_conversion_exact(calib_ids):
    model = make_tiny("llama-gqa")
    conv = convert(model, LowRankConfig(kv_lora_rank=56, qk_rope_head_dim=8, attn_temperature=1.0,
                                        head_temperatures=False, output_refit=True), calib_ids=calib_ids, progress=False)
    entry = record_of(conv)["split_search"]["output_refit"]
    assert max(entry["error_before"]) < SETTLED and entry["error_after"] == entry["error_before"]
    x = calib_ids[:2]
    with torch.no_grad():
        diff = (conv(x).logits - model(x).logits).abs().max()
    assert diff < 1e-3, diff


def test_too_few_tokens_skip_the_refit_and_say_so():
    model = make_tiny("llama-gqa")
    ids = torch.randint(0, 320, (7, 16))
    conv = convert(model, LowRankConfig(kv_lora_rank=8, qk_rope_head_dim=4, attn_temperature=1.0,
                                        head_temperatures=False, output_refit=True), calib_ids=ids, progress=False)
    off = convert(model, LowRankConfig(kv_lora_rank=8, qk_rope_head_dim=4, attn_temperature=1.0, head_temperatures=False,
                                       output_refit=False), calib_ids=ids, progress=False)
    assert record_of(conv)["split_search"]["output_refit"]["skipped"] == "too few calibration tokens"
    assert all(torch.equal(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight)
               for a, b in zip(conv.model.layers, off.model.layers))


def test_cli_flags_reach_the_config():
    from latentkv.cli.commands import convert_config
    from latentkv.cli.parser import build_parser

    parser = build_parser()
    for flags, want in (([], (False, 16)), (["--output-refit", "off"], (False, 16)),
                        (["--output-refit", "on", "--refit-windows", "3"], (True, 3))):
        config = convert_config(parser.parse_args(["convert", "smollm2-135m", "--kv-budget", "0.5", "--out", "x", *flags]))
        assert (config.output_refit, config.refit_windows) == want


def test_refit_windows_must_be_positive():
    with pytest.raises(Exception, match="--refit-windows"):
        LowRankConfig(kv_budget=0.5, refit_windows=0)

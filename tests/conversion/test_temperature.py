"""Attention temperatures: per-head factors fitted to the source's attention, one shared factor chosen
on calibration text, both folded exactly into the queries."""

from __future__ import annotations

import pytest
import torch

from latentkv import convert, record_of
from latentkv.conversion.configs import LowRankConfig
from latentkv.conversion.prefix import PrefixWalk
from latentkv.conversion.temperature import choose_temperature, fit_head_scales, query_state, scale_logits
from latentkv.errors import LatentKVError
from latentkv.runtime.mla import MLAAttention

from conftest import make_tiny, run_cli


@pytest.fixture(scope="module")
def calib_ids():
    torch.manual_seed(3)
    return torch.randint(0, 320, (10, 32))  # 5 fit + 5 held-out windows


def causal_rows(m: int, s: int) -> torch.Tensor:
    """(m, 1, s) visibility of m query rows spread over s keys, causal."""
    rows = torch.linspace(1, s - 1, m).round().long()
    return (torch.arange(s)[None] <= rows[:, None])[:, None]


def test_fit_recovers_the_factors_that_made_the_target():
    torch.manual_seed(0)
    m, h, s = 96, 3, 40
    nope, rope, visible = torch.randn(m, h, s) * 2, torch.randn(m, h, s) * 2, causal_rows(m, s)
    truth = torch.tensor([[1.6, 0.7], [0.8, 1.3], [1.0, 1.0]])
    target = torch.softmax((truth[:, 0, None] * nope + truth[:, 1, None] * rope).masked_fill(~visible, -torch.inf), -1)
    got = fit_head_scales(target, nope, rope, visible)
    assert torch.allclose(got, truth, atol=2e-3), got


def test_fit_with_no_rotated_part_still_fits_the_latent_one():
    torch.manual_seed(1)
    m, h, s = 64, 2, 24
    nope, rope, visible = torch.randn(m, h, s) * 2, torch.zeros(m, h, s), causal_rows(m, s)
    target = torch.softmax((1.4 * nope).masked_fill(~visible, -torch.inf), -1)
    got = fit_head_scales(target, nope, rope, visible)
    assert torch.isfinite(got).all() and torch.allclose(got[:, 0], torch.full((h,), 1.4), atol=2e-3), got


def attn_layers(model) -> list[MLAAttention]:
    return [layer.self_attn for layer in model.model.layers]


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2-bias", "qwen3-qknorm", "gemma3-qknorm"])
def test_scale_query_scales_each_part_of_each_head_exactly(family, calib_ids):
    conv = convert(make_tiny(family), LowRankConfig(kv_lora_rank=12, qk_rope_head_dim=8, attn_temperature=1.0,
                                                    head_temperatures=False,
                                                    rope="2norm" if family == "qwen3-qknorm" else "rorope"),
                   calib_ids=calib_ids, progress=False)
    attn = attn_layers(conv)[0]
    torch.manual_seed(2)
    x = torch.randn(2, 9, conv.config.hidden_size)
    rope = PrefixWalk.embedded(conv, torch.zeros(1, 9, dtype=torch.long)).ropes[0]  # Gemma-3: its layer type's
    with torch.no_grad():
        nope0, rope0 = attn.score_parts(x, rope)
        a, b = torch.tensor([1.5, 0.5, 2.0, 1.0]), torch.tensor([0.8, 1.25, 1.0, 3.0])
        attn.scale_query(a, b)
        nope1, rope1 = attn.score_parts(x, rope)
    assert torch.allclose(nope1, nope0 * a[:, None, None], rtol=1e-5, atol=1e-6)
    assert torch.allclose(rope1, rope0 * b[:, None, None], rtol=1e-5, atol=1e-6)


def test_default_conversion_fits_and_records_its_temperatures(calib_ids):
    conv = convert(make_tiny("llama-gqa"), LowRankConfig(kv_lora_rank=8, qk_rope_head_dim=4), calib_ids=calib_ids,
                   progress=False)
    entry = record_of(conv)["split_search"]["attn_temperature"]
    assert len(entry["layers"]) == 2 and all(len(layer["nope"]) == 4 == len(layer["rope"]) for layer in entry["layers"])
    assert entry["max_deviation"] > 0 and entry["temperature"] in [float(k) for k in entry["nll"]]
    assert entry["nll"][str(entry["temperature"])] == min(entry["nll"].values())
    assert entry["fit_windows"][0] <= 4 and entry["chosen_on"][1] == 32  # no tokenizer: the held-out windows


def test_fixed_factor_and_off(calib_ids):
    model = make_tiny("llama-gqa")
    base = dict(kv_lora_rank=8, qk_rope_head_dim=4, head_temperatures=False)
    off = convert(model, LowRankConfig(**base, attn_temperature=1.0), calib_ids=calib_ids, progress=False)
    hot = convert(model, LowRankConfig(**base, attn_temperature=1.5), calib_ids=calib_ids, progress=False)
    assert "attn_temperature" not in (record_of(off).get("split_search") or {})
    assert record_of(hot)["split_search"]["attn_temperature"]["temperature"] == 1.5
    for a, b in zip(attn_layers(off), attn_layers(hot)):
        assert torch.allclose(b.q_proj.weight, 1.5 * a.q_proj.weight)
        assert torch.equal(b.kv_a_proj_with_mqa.weight, a.kv_a_proj_with_mqa.weight)  # the cache is untouched


def test_choose_stops_at_the_first_rise_and_folds_the_best(calib_ids):
    conv = convert(make_tiny("llama-gqa"), LowRankConfig(kv_lora_rank=8, qk_rope_head_dim=4, attn_temperature=1.0,
                                                         head_temperatures=False), calib_ids=calib_ids, progress=False)
    base = query_state(conv)
    key = next(iter(base))

    def nll(model, windows):  # a stand-in NLL with its minimum at a factor of 1.3
        return (model.state_dict()[key].norm() / base[key].norm() - 1.3).abs().item()

    chosen = choose_temperature(conv, calib_ids[:2], nll)
    assert chosen["temperature"] == 1.3 and list(chosen["nll"]) == ["1.0", "1.1", "1.2", "1.3", "1.4"]
    assert torch.allclose(conv.state_dict()[key], 1.3 * base[key])
    scale_logits(conv, 1 / 1.3)
    assert torch.allclose(conv.state_dict()[key], base[key], atol=1e-6)


def test_bad_values_are_one_line_errors(capsys):
    with pytest.raises(LatentKVError, match="--attn-temperature"):
        LowRankConfig(kv_budget=0.5, attn_temperature=0.0)
    with pytest.raises(LatentKVError, match="--temperature-seq-len"):
        LowRankConfig(kv_budget=0.5, temperature_seq_len=4)
    with pytest.raises(SystemExit):  # argparse: usage, then the one-line reason
        run_cli(capsys, "convert", "x", "--out", "y", "--attn-temperature", "hot")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--attn-temperature" in err and "auto, off or a number" in err


def test_cli_flag_maps_to_the_config():
    from latentkv.cli.commands import temperature_flags
    from latentkv.cli.parser import build_parser

    parser = build_parser()
    for argv, want in (([], {"attn_temperature": None}), (["auto"], {"attn_temperature": None}),
                       (["off"], {"attn_temperature": 1.0, "head_temperatures": False}),
                       (["1.25"], {"attn_temperature": 1.25})):
        flag = ["--attn-temperature", *argv] if argv else []
        a = parser.parse_args(["convert", "smollm2-135m", "--out", "x", *flag])
        assert temperature_flags(a.attn_temperature) == want
        LowRankConfig(kv_budget=0.5, **want)  # each is a valid config

"""Attention biases on the way to a DeepSeek-V3 export (conversion/biases.py): exact moves, folds, reports."""

import pytest
import torch

from latentkv import LowRankConfig, convert, record_of
from latentkv.conversion import converters
from latentkv.conversion.biases import constant_read, fold_constant, value_offsets
from latentkv.record import bias_folds

from conftest import make_tiny


def calib():
    torch.manual_seed(3)
    return torch.randint(0, 320, (8, 64))


def test_exact_moves_keep_the_function(monkeypatch, ids):
    """At full latent rank, the export-form conversion (non-rotated key bias dropped, value bias moved to
    o_proj) computes what the same split with every bias kept in the latent computes."""
    cfg = LowRankConfig(kv_lora_rank=56, qk_rope_head_dim=8, rope="rorope-export", rope_slot0=4)  # Y: 24 + 32 rows
    model = make_tiny("qwen2-bias")
    moved = convert(model, cfg, calib_ids=calib(), progress=False)
    attn = moved.model.layers[0].self_attn
    assert "kv_a_proj_with_mqa.bias" in attn.state_dict()  # the rope key's bias stays (native runtime)
    assert attn.kv_a_proj_with_mqa.bias[:56].abs().max() == 0 and attn.o_proj.bias.abs().max() > 0
    monkeypatch.setattr(converters, "move_exact_biases", lambda src, layout, parts: (src, parts))
    kept = convert(model, cfg, calib_ids=calib(), progress=False)
    assert kept.model.layers[0].self_attn.kv_a_proj_with_mqa.bias[:56].abs().max() > 0
    with torch.no_grad():
        a, b = moved(ids).logits, kept(ids).logits
    assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())


def test_fold_is_exact_when_the_input_holds_a_constant():
    torch.manual_seed(0)
    x = torch.randn(200, 6, dtype=torch.float64)
    x[:, 2] = 3.0
    a, missed = constant_read(x)
    assert missed < 1e-10
    w, b = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    assert torch.allclose(x @ fold_constant(w, b, a).T, x @ w.T + b, atol=1e-6)
    _, missed_zero_mean = constant_read(torch.randn(200, 6, dtype=torch.float64))
    assert missed_zero_mean > 0.9  # no constant to read: the fold keeps almost nothing, and says so


def test_value_offsets_reproduce_a_bias_in_range():
    torch.manual_seed(0)
    w_o = torch.randn(8, 12)
    delta, residual = value_offsets(w_o, w_o @ torch.randn(12))
    assert residual < 1e-6 and torch.allclose(w_o.double() @ delta, w_o.double() @ torch.linalg.lstsq(
        w_o.double(), (w_o.double() @ delta)[:, None]).solution[:, 0], atol=1e-8)


@pytest.mark.parametrize("stream", [False, True])
def test_export_grade_conversion_drops_every_bias_and_records_it(stream, tmp_path):
    from latentkv.conversion.configs import make_config

    model = make_tiny("qwen2-bias")
    cfg = make_config(kv_budget=0.5, target="deepseek_v3")
    if stream:
        from latentkv import load
        from latentkv.conversion.streaming import convert_streaming

        model.save_pretrained(tmp_path / "src")
        convert_streaming(tmp_path / "src", cfg, tmp_path / "out", calib_ids=calib(), progress=False)
        conv, _ = load(tmp_path / "out")
    else:
        conv = convert(model, cfg, calib_ids=calib(), progress=False)
    for layer in conv.model.layers:
        d = layer.self_attn.dims
        assert not (d.q_bias or d.kv_a_bias or d.o_bias)
        assert not any(k.endswith("bias") for k in layer.self_attn.state_dict())
    folds = bias_folds(record_of(conv))
    assert folds["layers"] == 2 and folds["query_bias"] == "folded" and folds["value_bias"] == "carrier"
    assert 0 <= folds["constant_residual"] <= 1


def test_no_biases_no_report():
    conv = convert(make_tiny("llama-gqa"), LowRankConfig(kv_budget=0.5, rope="rorope-export", latent_norm=True),
                   calib_ids=calib(), progress=False)
    assert bias_folds(record_of(conv)) is None


def test_fold_costs_on_a_biased_source():
    from latentkv.conversion.biases import fold_costs

    model = make_tiny("qwen2-bias")
    rows = fold_costs(model, calib())
    assert len(rows) == 2
    for row in rows:
        assert row["constant_residual"] >= 0  # held out, so a random tiny model may even exceed 1
        assert 0 <= row["query_error"] and 0 <= row["key_error"]
    assert "query_error" not in fold_costs(make_tiny("llama-gqa"), calib())[0]  # no bias, nothing to fold

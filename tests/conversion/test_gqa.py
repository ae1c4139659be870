"""--target gqa: fewer KV heads in the source's own architecture (conversion/gqa.py)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from latentkv import LatentKVError, to_gqa
from latentkv.cli import main

from conftest import SAMPLE, make_tiny


def calib():
    torch.manual_seed(3)
    return torch.randint(0, 320, (8, 64))


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "qwen2-bias", "mistral-sliding", "gemma2-softcap"])
def test_same_kv_heads_is_the_source(name, ids):
    model = make_tiny(name)
    same = to_gqa(model, model.config.num_key_value_heads, calib_ids=calib(), progress=False)
    with torch.no_grad():
        ref = model(ids).logits
        assert (same(ids).logits - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_identical_heads_merge_exactly(ids):
    """Head 1's key pairs are a complex multiple (scaled rotation) of head 0's and its values a linear map of
    head 0's: one merged head carries both, at every position (the merge is RoPE-aware)."""
    model = make_tiny("llama-gqa")  # 4 query heads, 2 KV heads of 16
    d, half = 16, 8
    with torch.no_grad():
        for layer in model.model.layers:
            k, v = layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight
            angle = torch.linspace(0.3, 2.0, half)[:, None]
            re, im = k[:half], k[half:d]
            k[d:d + half], k[d + half:] = 1.7 * (torch.cos(angle) * re - torch.sin(angle) * im), 1.7 * (
                torch.sin(angle) * re + torch.cos(angle) * im)
            v[d:] = torch.randn(d, d) @ v[:d] * 0.3
    merged = to_gqa(model, 1, calib_ids=calib(), progress=False)
    with torch.no_grad():
        ref = model(ids).logits
        assert (merged(ids).logits - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_merge_is_activation_aware_and_stays_close(ids):
    model = make_tiny("llama-mha")
    with torch.no_grad():
        ref = model(ids).logits
        errs = [(to_gqa(model, k, calib_ids=calib(), progress=False)(ids).logits - ref).pow(2).mean().item()
                for k in (4, 2, 1)]
    assert errs[0] < 1e-10 < errs[1] <= errs[2] < ref.pow(2).mean().item()  # fewer heads, more error, bounded


@pytest.mark.parametrize("kv, match", [(0, "must divide 2"), (3, "must divide 2"), (4, "must divide 2")])
def test_bad_kv_heads_are_one_line(kv, match):
    with pytest.raises(LatentKVError, match=match):
        to_gqa(make_tiny("llama-gqa"), kv, calib_ids=calib(), progress=False)


def test_qk_norm_is_refused():
    with pytest.raises(LatentKVError, match="QK-norm"):
        to_gqa(make_tiny("qwen3-qknorm"), 1, calib_ids=calib(), progress=False)


def test_cli_writes_a_stock_checkpoint(capsys, tmp_path, tiny_tokenizer, ids):
    src = tmp_path / "src"
    model = make_tiny("qwen2-bias")
    model.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    (tmp_path / "calib.txt").write_text(SAMPLE * 3)
    code = main(["convert", str(src), "--target", "gqa", "--kv-heads", "1", "--out", str(tmp_path / "g"),
                 "--calib", str(tmp_path / "calib.txt"), "--calib-samples", "4", "--calib-seq-len", "32", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["kv_heads"] == 1 and out["source_kv_heads"] == 2
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "g", use_safetensors=True)
    assert type(stock).__name__ == "Qwen2ForCausalLM" and stock.config.num_key_value_heads == 1
    assert stock.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    with torch.no_grad():
        assert (stock(ids).logits - model(ids).logits).abs().max() < 0.5  # a merge, not a different model
    code = main(["convert", str(src), "--target", "gqa", "--out", str(tmp_path / "h")])
    assert code == 2 and "--kv-heads" in capsys.readouterr().err


def test_default_calibration_reads_the_mixture(tiny_tokenizer, ids):
    """No calib_ids: the default mixture, read with the tokenizer (as `convert` does)."""
    from latentkv.conversion.configs import LowRankConfig

    model = make_tiny("llama-gqa")
    merged = to_gqa(model, 1, tokenizer=tiny_tokenizer, calib=LowRankConfig(kv_budget=0.5, calib_samples=4,
                                                                          calib_seq_len=32), progress=False)
    assert merged.config.num_key_value_heads == 1
    with pytest.raises(LatentKVError, match="tokenizer"):
        to_gqa(model, 1, progress=False)

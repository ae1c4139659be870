"""Kernel-ready presets: `convert --preset flashmla|flashinfer` makes the shapes fast MLA kernels take,
in memory and streaming, exports, and verifies; presets that do not shrink the cache are refused."""

from __future__ import annotations

import json

import pytest

from latentkv.cli import main
from latentkv.conversion.configs import PRESETS
from latentkv.deepseek.layout import FAST_KERNEL_DIMS

from conftest import SAMPLE, make_tiny

CALIB = ["--calib-samples", "4", "--calib-seq-len", "32"]


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tiny_tokenizer):
    """A 2-layer source wide enough for 512 + 64: 4 KV heads of 128 dims (1024 cache values), hidden 1024."""
    root = tmp_path_factory.mktemp("preset")
    make_tiny("llama-mha", layers=2, hidden_size=1024, num_attention_heads=4, num_key_value_heads=4, head_dim=128,
              intermediate_size=256).save_pretrained(root / "src")
    tiny_tokenizer.save_pretrained(root / "src")
    (root / "text.txt").write_text(SAMPLE * 8)
    return root


def convert(capsys, wide, out, *flags) -> tuple[int, dict | str]:
    code = main(["convert", str(wide / "src"), "--out", str(wide / out), "--calib", str(wide / "text.txt"), *CALIB,
                 "--json", *flags])
    stdout, err = capsys.readouterr()
    return code, json.loads(stdout) if code == 0 else err


def test_presets_are_the_kernel_shapes():
    assert set(PRESETS.values()) == set(FAST_KERNEL_DIMS) == {(512, 64), (256, 64)}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("stream", [False, True])
def test_preset_converts_exports_and_verifies(capsys, wide, preset, stream):
    out = f"{preset}-{'stream' if stream else 'mem'}"
    code, result = convert(capsys, wide, out, "--preset", preset, *(["--stream"] if stream else []))
    assert code == 0, result
    assert (result["kv_lora_rank"], result["qk_rope_head_dim"]) == PRESETS[preset]
    record = json.loads((wide / out / "latentkv.json").read_text())["record"]
    assert record["conversion"]["preset"] == preset and record["conversion"]["rope"] == "rorope-export"
    assert main(["export", str(wide / out), "--out", str(wide / f"{out}-ds")]) == 0
    config = json.loads((wide / f"{out}-ds" / "config.json").read_text())
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == PRESETS[preset]
    capsys.readouterr()
    assert main(["verify-export", str(wide / f"{out}-ds"), "--against", str(wide / out), "--tokens", "16"]) == 0


def test_preset_that_saves_nothing_is_refused(capsys, tmp_path, tiny_tokenizer):
    make_tiny("llama-gqa").save_pretrained(tmp_path / "small")  # 2 KV heads x 16 dims: 64 cache values
    tiny_tokenizer.save_pretrained(tmp_path / "small")
    capsys.readouterr()
    code = main(["convert", str(tmp_path / "small"), "--out", str(tmp_path / "out"), "--preset", "flashinfer"])
    err = capsys.readouterr().err
    assert code == 2 and "caches 256+64 = 320" in err and "saves nothing" in err
    assert "Traceback" not in err and len([x for x in err.splitlines() if x.startswith("error:")]) == 1
    assert not (tmp_path / "out").exists()


def test_budget_is_the_cap_a_preset_must_fit(capsys, wide):
    code, err = convert(capsys, wide, "capped", "--preset", "flashmla", "--kv-budget", "0.5")  # 512 < 576
    assert code == 2 and "more than the 512 that --kv-budget 0.5 allows" in err
    assert main(["convert", str(wide / "src"), "--out", str(wide / "below"), "--calib", str(wide / "text.txt"), *CALIB,
                 "--preset", "flashinfer", "--kv-budget", "0.5", "-q"]) == 0
    assert "warning: --preset flashinfer caches 320 values per token per layer, below the 512" in capsys.readouterr().err


def test_preset_with_explicit_dims_is_refused(capsys, wide):
    code, err = convert(capsys, wide, "both", "--preset", "flashmla", "--kv-lora-rank", "128",
                        "--qk-rope-head-dim", "64")
    assert code == 2 and "sets the dims itself" in err

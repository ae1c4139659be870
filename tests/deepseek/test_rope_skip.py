"""Exportable RoPE schedules that skip frequencies: first components at 0..a-1, then at a+s..m-1+s,
which DeepSeek-V3 engines run as YaRN at factor > 1 (the softmax factor it adds folded into the query)."""

import json

import pytest
import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3RotaryEmbedding

from latentkv import LatentKVError, convert
from latentkv.conversion.configs import make_config
from latentkv.conversion.rope import KeySplit, best_schedule, export_kept, frequency_runs
from latentkv.deepseek.export import export
from latentkv.deepseek.reader import load_engine_checkpoint
from latentkv.families import source_layout
from latentkv.reports.verify import load_stock

from conftest import make_tiny


def calib():
    torch.manual_seed(3)
    return torch.randint(0, 320, (8, 64))


def test_skip_schedules_are_exportable_and_others_are_not():
    assert export_kept(4, 2, 3) == ((0, 0), (0, 1), (0, 5), (0, 6))
    def freqs(kept):
        return [i for _, i in kept]

    assert frequency_runs(freqs(export_kept(4, 2, 3))) == (2, 3) and frequency_runs(freqs(export_kept(4, 4))) == (4, 0)
    assert KeySplit(export_kept(4, 2, 3)).exportable() and KeySplit(export_kept(4, 3)).exportable()
    for kept in (((0, 1), (0, 2)), ((0, 0), (0, 2), (0, 4)), ((0, 0), (1, 3))):  # late start, two gaps, slot 1 late
        assert not KeySplit(kept).exportable(), kept


def test_best_schedule_skips_where_the_energy_is_slow_when_asked():
    lay = source_layout(make_tiny("llama-gqa").config)  # 2 KV heads x 8 frequencies
    e = torch.zeros(2, 8)
    e[0, [0, 4, 5, 6]] = 1.0  # the fastest frequency and three slow ones
    assert best_schedule([e], lay, 4, skip=True) == (1, 3)
    assert best_schedule([e], lay, 4)[1] == 0  # by default energy chooses among second-component schedules only
    both = torch.zeros(2, 8)
    both[:, :2] = 1.0  # both components of the two fastest: second components, no skip
    assert best_schedule([both], lay, 4, skip=True) == (2, 0)
    assert best_schedule([e], lay, 4, most=5, skip=True) != (1, 3)  # a skip past the plain frequencies is not offered


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "mistral-gqa"])
def test_skip_schedule_exports_exactly_and_reads_back(name, tmp_path):
    model = make_tiny(name)
    conv = convert(model, make_config(kv_lora_rank=24, qk_rope_head_dim=8, target="deepseek_v3", rope_slot0=2,
                                      rope_skip=3), calib_ids=calib(), progress=False)
    assert conv.model.layers[0].self_attn.rope_freq_idx.tolist() == [0, 1, 5, 6]
    export(conv, tmp_path / "ds")
    rope = json.loads((tmp_path / "ds" / "config.json").read_text())["rope_scaling"]
    assert rope["rope_type"] == "yarn" and rope["factor"] > 1 and rope["mscale"] == rope["mscale_all_dim"]
    cfg = DeepseekV3Config.from_pretrained(tmp_path / "ds")
    rotary = DeepseekV3RotaryEmbedding(cfg)
    src = model.model.rotary_emb.inv_freq.double()
    assert torch.allclose(rotary.inv_freq.double(), src[[0, 1, 5, 6]], rtol=1e-5) and rotary.attention_scaling == 1
    x = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        ref = conv(x).logits
        assert ref.abs().max() > 0.1
        assert (load_stock(tmp_path / "ds")(x).logits - ref).abs().max() < 1e-4
        back, _ = load_engine_checkpoint(tmp_path / "ds")
        for path in ("expanded", "absorbed"):
            assert (back(x, mla_path=path).logits - ref).abs().max() < 1e-4, path


def test_bad_skips_are_one_line():
    with pytest.raises(LatentKVError, match="--rope-skip 9 does not fit 4 rope pairs"):
        convert(make_tiny("llama-gqa"), make_config(kv_lora_rank=24, qk_rope_head_dim=8, target="deepseek_v3",
                                                    rope_slot0=2, rope_skip=9), calib_ids=calib(), progress=False)
    with pytest.raises(LatentKVError, match="needs --rope-slot0"):
        make_config(kv_lora_rank=24, qk_rope_head_dim=8, target="deepseek_v3", rope_skip=2)

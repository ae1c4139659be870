"""Configs round-trip through the record, and a loaded record is read back through them."""

import json
import shutil
from pathlib import Path

import pytest

from latentkv import ExactConfig, LowRankConfig, SVDConfig, load_model
from latentkv.conversion.configs import config_from_dict, config_to_dict, make_config
from latentkv.errors import LatentKVError

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy"

CONFIGS = [
    ExactConfig(),
    SVDConfig(kv_budget=0.5),
    SVDConfig(kv_lora_rank=8, qk_rope_head_dim=4),
    LowRankConfig(kv_budget=0.25),
    LowRankConfig(kv_values=100, rope="2norm", factorizer="pca", sequential=True, attn_moment=0.0,
                  rope_horizon=0, calib="some/file.txt", calib_samples=3, calib_seq_len=64),
    LowRankConfig(kv_lora_rank=12, qk_rope_head_dim=8, rope="rorope-fold2", rank_allocation="sensitivity"),
    make_config(kv_budget=0.5, target="deepseek_v3"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: repr(c)[:60])
def test_from_dict_of_to_dict_is_the_config(config):
    data = json.loads(json.dumps(config_to_dict(config)))  # what the record stores on disk
    assert data["method"] == config.method and data["version"] == config.version
    assert config_from_dict(data) == config


def test_unknown_method_or_version_is_one_line():
    with pytest.raises(LatentKVError, match="unknown conversion method 'magic'"):
        config_from_dict({"method": "magic", "version": 1})
    with pytest.raises(LatentKVError, match="v99, this latentkv reads v1"):
        config_from_dict({**config_to_dict(LowRankConfig(kv_budget=0.5)), "version": 99})


def test_loading_a_checkpoint_reads_its_config_back(tmp_path):
    """A record from a newer latentkv (config version 99) is refused on load, in one line."""
    shutil.copytree(LEGACY / "lowrank-llama", tmp_path / "ckpt")
    meta_path = tmp_path / "ckpt" / "latentkv.json"
    meta = json.loads(meta_path.read_text())
    meta["record"]["conversion"]["version"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(LatentKVError, match="config v99"):
        load_model(tmp_path / "ckpt", progress=False)

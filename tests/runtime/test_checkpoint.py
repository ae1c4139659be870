"""Native checkpoints: round trip, atomic writes, overwrite rules, corruption."""

import json

import pytest
import torch

from latentkv import SVDConfig, convert, load, save
from latentkv.errors import LatentKVError

from conftest import make_tiny


@pytest.fixture
def converted():
    return convert(make_tiny("qwen2-bias"), SVDConfig(kv_budget=0.5), progress=False)


def test_round_trip_identical_logits(converted, tiny_tokenizer, tmp_path, ids):
    save(converted, tiny_tokenizer, tmp_path / "out")
    loaded, tok = load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, loaded(ids).logits)
    assert loaded.config.latentkv["conversion"] == converted.config.latentkv["conversion"]
    assert tok("fox").input_ids == tiny_tokenizer("fox").input_ids
    assert not (tmp_path / "out" / "config.json").exists()  # stock loaders must not mistake it for the source


def test_tied_embeddings_survive(tmp_path, ids):
    model = make_tiny("llama-gqa")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    conv = convert(model, SVDConfig(kv_budget=0.5), progress=False)
    save(conv, None, tmp_path / "tied")
    loaded, _ = load(tmp_path / "tied")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(conv(ids).logits, loaded(ids).logits)


def test_existing_output_needs_overwrite(converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LatentKVError, match="--overwrite"):
        save(converted, None, out)
    assert (out / "keep.txt").read_text() == "mine"
    save(converted, None, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dirs left behind


def test_failed_save_leaves_nothing(converted, tmp_path, monkeypatch):
    import latentkv.io.checkpoint as ckpt

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "unique_state", boom)
    with pytest.raises(RuntimeError):
        save(converted, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate_weights", "bad_json", "drop_tensor", "no_meta_key"])
def test_corrupted_checkpoint_is_one_line_error(converted, tmp_path, damage):
    out = tmp_path / "out"
    save(converted, None, out)
    weights, meta = out / "model.safetensors", out / "latentkv.json"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "bad_json":
        meta.write_text("{not json")
    elif damage == "no_meta_key":
        meta.write_text(json.dumps({"record": {}}))
    else:
        from safetensors.torch import load_file, save_file

        state = load_file(str(weights))
        state.pop(next(k for k in state if "kv_b_proj" in k))
        save_file(state, str(weights))
    with pytest.raises(LatentKVError, match="corrupted checkpoint") as e:
        load(out)
    assert "\n" not in str(e.value)


def test_save_refuses_unconverted_model(tmp_path):
    with pytest.raises(LatentKVError, match="converted"):
        save(make_tiny("llama-gqa"), None, tmp_path / "x")

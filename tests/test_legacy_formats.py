"""Checkpoints written before the package was split into subpackages still load, compute the same
logits, and are written back in the same format (tests/fixtures/make_legacy.py made them)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentkv import load_model, save

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
NATIVE = ("lowrank-llama", "exact-qwen2")


@pytest.fixture(scope="module")
def reference():
    return load_file(str(LEGACY / "logits.safetensors"))


@pytest.mark.parametrize("name", NATIVE)
def test_legacy_native_checkpoint_loads_with_same_logits(name, reference):
    model, tok = load_model(LEGACY / name, progress=False)
    assert tok is not None
    with torch.no_grad():
        got = model(reference["ids"]).logits
    torch.testing.assert_close(got, reference[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NATIVE)
def test_legacy_record_written_back_unchanged(name, tmp_path):
    model, tok = load_model(LEGACY / name, progress=False)
    save(model, tok, tmp_path / "again")
    old = json.loads((LEGACY / name / "latentkv.json").read_text())
    new = json.loads((tmp_path / "again" / "latentkv.json").read_text())
    assert new["record"] == old["record"]
    assert new["source_config"].keys() == old["source_config"].keys()
    assert load_file(str(tmp_path / "again" / "model.safetensors")).keys() == \
        load_file(str(LEGACY / name / "model.safetensors")).keys()


def test_legacy_export_imports_with_the_native_logits(reference):
    model, _ = load_model(LEGACY / "export-llama", progress=False)
    assert model.config.latentkv["conversion"]["method"] == "lowrank"
    with torch.no_grad():
        got = model(reference["ids"]).logits
    torch.testing.assert_close(got, reference["lowrank-llama"], atol=1e-4, rtol=1e-4)

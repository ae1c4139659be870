"""Healing with the layers' hidden states as extra targets (`--hidden-weight`)."""

from __future__ import annotations

import json

import pytest
import torch
from test_heal import dirs, small, teacher_kl  # noqa: F401  (dirs is a fixture)

from latentkv.errors import LatentKVError
from latentkv.healing.losses import hidden_mse
from latentkv.healing.run import HealConfig, heal


def test_hidden_mse_is_relative_per_token_and_skips_embeddings():
    torch.manual_seed(0)
    t = tuple(torch.randn(2, 5, 8) for _ in range(4))  # embeddings + 3 layers
    assert float(hidden_mse(t, t)) == 0
    s = (t[0] + 100,) + tuple(x * 1.1 for x in t[1:])  # the embeddings' error must not count
    assert float(hidden_mse(s, t)) == pytest.approx(0.01, rel=1e-5)  # |0.1 h|^2 / |h|^2 for every token
    loud = tuple(x.clone() for x in t)
    for x in loud:
        x[:, 0] *= 1000  # one sink-like token with a huge norm weighs like any other
    assert float(hidden_mse(tuple(x * 1.1 for x in loud), loud)) == pytest.approx(0.01, rel=1e-5)
    with pytest.raises(LatentKVError, match="layer by layer"):
        hidden_mse(t[:3], t)


def test_hidden_loss_alone_heals_and_is_logged(dirs, tmp_path, tiny_tokenizer):  # noqa: F811
    out = tmp_path / "hidden"
    config = small(kl_weight=0.0, hidden_weight=1.0)
    heal(dirs / "low", dirs / "src", dirs / "data", out, config, progress=False)
    rows = [json.loads(r) for r in (out / "heal_log.jsonl").read_text().splitlines()]
    assert all(r["kl"] == 0 and r["loss"] == pytest.approx(r["hidden"]) for r in rows)
    assert rows[-1]["hidden"] < 0.85 * rows[0]["hidden"]
    # matching every layer's output is matching the model: the logits follow without a KL term
    assert teacher_kl(out, dirs, tiny_tokenizer) < 0.8 * teacher_kl(dirs / "low", dirs, tiny_tokenizer)


def test_exact_student_has_no_hidden_error(dirs, tmp_path):  # noqa: F811
    out = tmp_path / "exact"
    heal(dirs / "exact", dirs / "src", dirs / "data", out, small(tokens=16 * 4, hidden_weight=1.0), progress=False)
    first = json.loads((out / "heal_log.jsonl").read_text().splitlines()[0])
    assert first["hidden"] < 1e-8 and "hidden" in first


def test_hidden_weight_refusals(dirs, tmp_path):  # noqa: F811
    with pytest.raises(LatentKVError, match="teacher-cache"):
        heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "o", small(hidden_weight=1.0),
             teacher_cache=tmp_path / "cache", progress=False)
    with pytest.raises(LatentKVError, match=">= 0"):
        HealConfig(hidden_weight=-1.0)
    with pytest.raises(LatentKVError, match="all 0"):
        HealConfig(kl_weight=0.0)

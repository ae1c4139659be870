"""The default calibration mixture: every domain and a repeats share, held-out windows from each
component, reproducible and fingerprinted in the record, and it works with domains missing."""

import logging

import pytest
import torch

from latentkv import LowRankConfig, convert
from latentkv.conversion import mixture
from latentkv.conversion.calibration import HELD_OUT, calibration_ids, held_positions, split_ids
from latentkv.errors import LatentKVError

from conftest import make_tiny


def test_held_out_windows_come_from_different_components():
    names = ["wikitext2", "fiction", "code", "docs", mixture.REPEATS]
    parts = {n: [torch.full((4,), k)] * 3 for k, n in enumerate(names)}
    ids = mixture._arrange(parts, names, 15, held_positions(15))
    held = split_ids(ids)[1]
    assert sorted(int(w[0]) for w in held) == list(range(5))  # one of each
    assert sorted(int(w[0]) for w in ids) == sorted(list(range(5)) * 3)  # every window used once


def test_repeat_windows_bring_a_span_back():
    stream = torch.arange(1000)
    for w in mixture._repeats(stream, 3, 64):
        assert w.shape == (64,) and torch.equal(w[:16], w[-16:]) and not torch.equal(w[16:32], w[:16])


def test_default_calibration_is_the_mixture_and_reproducible(tiny_tokenizer):
    config = LowRankConfig(kv_budget=0.5, calib_samples=10, calib_seq_len=64)
    assert config.calib == mixture.MIX
    ids, info = calibration_ids(tiny_tokenizer, config)
    again, _ = calibration_ids(tiny_tokenizer, config)
    assert ids.shape == (10 + HELD_OUT, 64) and torch.equal(ids, again)
    assert info["text"] == "mix" and sum(info["components"].values()) == 15
    assert set(info["components"]) == {"wikitext2", "fiction", "code", "docs", "repeats"}


def test_record_fingerprints_the_calibration(tiny_tokenizer):
    model = make_tiny("llama-gqa")
    a = convert(model, LowRankConfig(kv_budget=0.5, calib_samples=4, calib_seq_len=32), tokenizer=tiny_tokenizer,
                progress=False).config.latentkv["calibration"]
    b = convert(model, LowRankConfig(kv_budget=0.5, calib_samples=4, calib_seq_len=48), tokenizer=tiny_tokenizer,
                progress=False).config.latentkv["calibration"]
    assert a["text"] == "mix" and a["windows"] == [4 + HELD_OUT, 32] and len(a["fingerprint"]) == 16
    assert a["fingerprint"] != b["fingerprint"]


def test_missing_domains_are_skipped_with_a_warning(tiny_tokenizer, monkeypatch, caplog):
    real = mixture.domain_text

    def offline(name, part):
        if name == "wikitext2":
            raise LatentKVError("'wikitext2-valid' needs the `datasets` package")
        return real(name, part)

    monkeypatch.setattr(mixture, "domain_text", offline)
    caplog.set_level(logging.WARNING, logger="latentkv")
    _, info = calibration_ids(tiny_tokenizer, LowRankConfig(kv_budget=0.5, calib_samples=3, calib_seq_len=32))
    assert "wikitext2" not in info["components"] and "no wikitext2 text here" in caplog.text
    monkeypatch.setattr(mixture, "domain_text", lambda name, part: (_ for _ in ()).throw(LatentKVError("gone")))
    with pytest.raises(LatentKVError, match="pass --calib FILE"):
        calibration_ids(tiny_tokenizer, LowRankConfig(kv_budget=0.5))


def test_copy_nll_scores_only_the_repeat():
    """A model that copies perfectly has copy NLL ~0 whatever its NLL elsewhere."""
    from types import SimpleNamespace

    from latentkv.conversion.calibration import copy_nll

    class Copier(torch.nn.Module):
        def forward(self, ids, use_cache=False):
            t, q = ids.shape[1], ids.shape[1] // 4
            logits = torch.zeros(1, t, 50)
            for i in range(t - q, t - 1):  # inside the repeat: the token one period back
                logits[0, i, ids[0, i + 1 - (t - q)]] = 40.0
            return SimpleNamespace(logits=logits)

    held = torch.randint(0, 50, (3, 32), generator=torch.Generator().manual_seed(0))
    assert copy_nll(Copier(), held) < 1e-6

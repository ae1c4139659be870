"""Healing with long windows mixed in: config checks, the step pattern, the shared token stream, resume."""

from __future__ import annotations

import json

import pytest
import torch
from test_heal import dirs, small, state, teacher_kl  # noqa: F401  (dirs is a fixture)

import latentkv.healing.loop as loop
from latentkv.errors import LatentKVError
from latentkv.healing.loop import long_windows
from latentkv.healing.run import heal

LONG = dict(long_seq_len=64, long_every=2)  # small(): 4 windows x 16 tokens = 64 tokens per step


@pytest.mark.parametrize("kw, match", [
    (dict(long_seq_len=64), "go together"),
    (dict(long_every=2), "go together"),
    (dict(long_seq_len=16, long_every=2), "longer than --seq-len"),
    (dict(long_seq_len=48, long_every=2), "divide the tokens per step"),
])
def test_bad_long_settings_are_one_line(kw, match):
    with pytest.raises(LatentKVError, match=match):
        small(**kw)


def test_long_windows_are_the_same_token_stream():
    windows = torch.arange(10 * 16).view(10, 16)
    long = long_windows(windows, small(**LONG))
    assert long.shape == (2, 64) and torch.equal(long.flatten(), windows.flatten()[:128])
    assert long_windows(windows, small()) is None
    with pytest.raises(LatentKVError, match="shorter than one step"):
        long_windows(windows[:3], small(**LONG))
    assert small(**LONG).accumulation(1) == 4  # short steps keep their own accumulation
    with pytest.raises(LatentKVError, match="do not split over 2 processes"):
        small(**LONG).accumulation(2)


def test_every_other_step_is_long_and_it_heals(dirs, tmp_path, tiny_tokenizer):  # noqa: F811
    out = tmp_path / "long"
    report = heal(dirs / "low", dirs / "src", dirs / "data", out, small(**LONG), progress=False)
    assert report["steps"] == 8 and report["tokens"] == 8 * 64  # tokens per step do not change
    rows = [json.loads(r) for r in (out / "heal_log.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in rows] == [16, 64] * 4
    assert teacher_kl(out, dirs, tiny_tokenizer) < 0.7 * teacher_kl(dirs / "low", dirs, tiny_tokenizer)


def test_long_windows_longer_than_a_step_count_their_tokens():
    # 64 tokens per short step, one 128-token window per long step: 64 + 128 = 192 tokens per pair
    config = small(tokens=1000, long_seq_len=128, long_every=2)
    assert config.long_batch == 1 and config.step_tokens(0) == 64 and config.step_tokens(1) == 128
    assert config.tokens_through(4) == 2 * 64 + 2 * 128
    n = config.steps()
    assert config.tokens_through(n) <= 1000 < config.tokens_through(n + 1) and n == 10
    assert small(**LONG).tokens_through(7) == 7 * 64  # long windows dividing a step change nothing
    assert small(long_seq_len=96, long_every=2).step_tokens(1) == 96  # need not be a multiple of a step


def test_one_long_window_per_step_heals_and_logs_its_tokens(dirs, tmp_path):  # noqa: F811
    config = small(tokens=16 * 32, batch_size=2, long_seq_len=64, long_every=3)  # 32 + 32 + 64 per three steps
    report = heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "out", config, progress=False)
    rows = [json.loads(r) for r in (tmp_path / "out" / "heal_log.jsonl").read_text().splitlines()]
    assert [r["seq_len"] for r in rows[:6]] == [16, 16, 64] * 2
    assert [r["tokens"] for r in rows[:3]] == [32, 64, 128]
    assert report["steps"] == 12 and report["tokens"] == rows[-1]["tokens"] == 4 * 128
    seconds = sum(r["time"] for r in rows)
    assert report["tokens_per_s"] == pytest.approx(4 * 128 / seconds, rel=0.05)  # every step's own tokens


def test_resume_through_long_steps_matches_uninterrupted(dirs, tmp_path, monkeypatch):  # noqa: F811
    config = small(**{**LONG, "long_every": 3})
    heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "ref", config, progress=False)
    real, calls = loop.optimizer_step, []

    def dies_at_step_6(*args, **kw):
        calls.append(1)
        if len(calls) == 6:  # after the step-4 checkpoint, inside the interval holding long step 6
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(loop, "optimizer_step", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "cut", config, progress=False)
    monkeypatch.setattr(loop, "optimizer_step", real)
    report = heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "cut", config, progress=False, resume=True)
    assert report["resumed_at_step"] == 4
    a, b = state(tmp_path / "ref"), state(tmp_path / "cut")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)

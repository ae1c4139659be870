"""Copy drills in the healing data (a random span planted twice in a share of the windows, seeded, wired into heal),
long-range drills in the long windows, and resuming a work dir started before such an option existed."""

from __future__ import annotations

import json

import pytest
import torch
from test_heal import dirs, small, teacher_kl  # noqa: F401  (dirs is a fixture)

from latentkv.errors import LatentKVError
from latentkv.healing.data import LONG_DRILL_MAX_LENGTH, pack, plant_copies, plant_long_copies, read_documents
from latentkv.healing.run import heal
from latentkv.io.text import fingerprint


def planted_span(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int, int]:
    """One window before/after planting (text ids outside the span ids' range, so every span position changed)
    -> (start, length, gap) of the two equal spans."""
    changed = (before != after).nonzero().flatten().tolist()
    assert changed, "the window was not changed"
    runs = [[changed[0]]]
    for i in changed[1:]:
        runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i])
    if len(runs) == 1:  # no gap: one run holding the span twice
        assert len(runs[0]) % 2 == 0
        runs = [runs[0][: len(runs[0]) // 2], runs[0][len(runs[0]) // 2:]]
    first, second = runs
    assert len(runs) == 2 and len(first) == len(second)
    assert torch.equal(after[first], after[second])
    return first[0], len(first), second[0] - first[-1] - 1


def test_a_share_of_windows_carries_one_repeated_span_and_nothing_else_moves():
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(1000, 1100, (40, 64), generator=g)  # text ids above the span ids' [0, 1000)
    special = [0, 1, 2]
    out = plant_copies(windows, 0.25, seed=3, vocab=1000, special=special)
    assert out.shape == windows.shape and out.dtype == windows.dtype
    touched = [w for w in range(40) if not torch.equal(out[w], windows[w])]
    assert len(touched) == 10  # round(0.25 * 40)
    lengths = set()
    for w in touched:
        start, length, gap = planted_span(windows[w], out[w])
        assert 8 <= length <= 16 and start + 2 * length + gap <= 64  # lengths in [T/8, T/4], both spans inside
        lengths.add(length)
        assert not set(out[w].tolist()) & set(special)
    assert len(lengths) > 1  # lengths vary per window
    assert torch.equal(windows, torch.randint(1000, 1100, (40, 64), generator=torch.Generator().manual_seed(0)))


def test_drills_are_seeded_and_share_zero_is_the_identity():
    windows = torch.arange(30 * 32).view(30, 32) % 500
    a = plant_copies(windows, 0.5, seed=1, vocab=500)
    assert torch.equal(a, plant_copies(windows, 0.5, seed=1, vocab=500))
    assert not torch.equal(a, plant_copies(windows, 0.5, seed=2, vocab=500))
    assert plant_copies(windows, 0.0, seed=1, vocab=500) is windows
    for bad in (-0.1, 1.0):
        with pytest.raises(LatentKVError, match="--copy-share"):
            plant_copies(windows, bad, seed=1, vocab=500)
        with pytest.raises(LatentKVError, match="--copy-share"):
            small(copy_share=bad)
    with pytest.raises(LatentKVError, match="too short"):
        plant_copies(windows[:, :4], 0.5, seed=1, vocab=500)


def test_heal_trains_on_the_planted_windows(dirs, tmp_path, tiny_tokenizer):  # noqa: F811
    out = tmp_path / "drills"
    config = small(copy_share=0.25)
    report = heal(dirs / "low", dirs / "src", dirs / "data", out, config, progress=False)
    plain = pack(tiny_tokenizer, read_documents(dirs / "data"), config.seq_len)
    vocab = min(len(tiny_tokenizer), json.loads((dirs / "src" / "config.json").read_text())["vocab_size"])
    planted = plant_copies(plain, 0.25, config.seed, vocab, tiny_tokenizer.all_special_ids)
    assert report["data_fingerprint"] == fingerprint(planted) != fingerprint(plain)
    assert teacher_kl(out, dirs, tiny_tokenizer) < 0.9 * teacher_kl(dirs / "low", dirs, tiny_tokenizer)  # it still heals


def test_resume_accepts_a_work_dir_from_before_an_option_existed(tmp_path):
    """A run started by a version without --copy-share resumes when the option is left at its default."""
    from latentkv.healing.state import prepare_work_dir

    work = tmp_path / "work"
    work.mkdir()
    (work / "run.json").write_text(json.dumps({"config": {"lr": 1e-3}, "data": "abc"}))
    defaults = {"lr": 2e-4, "copy_share": 0.0}
    run = {"config": {"lr": 1e-3, "copy_share": 0.0}, "data": "abc"}
    assert prepare_work_dir(work, run, resume=True, overwrite=False, defaults=defaults) is None  # no checkpoint yet
    with pytest.raises(LatentKVError, match="config differ"):
        prepare_work_dir(work, {**run, "config": {"lr": 1e-3, "copy_share": 0.1}}, True, False, defaults)
    with pytest.raises(LatentKVError, match="config differ"):  # without the defaults the record must match as is
        prepare_work_dir(work, run, resume=True, overwrite=False)


def test_long_drills_sit_in_the_long_windows_far_apart_and_short_ones_stay_as_they_were():
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(1000, 1100, (33, 64), generator=g)  # 2,112 tokens: 8 long windows of 256, a tail of 64
    out = plant_long_copies(windows, 256, 0.5, seed=3, vocab=1000, special=[0, 1])
    assert out.shape == windows.shape
    assert torch.equal(out.flatten()[8 * 256:], windows.flatten()[8 * 256:])  # the tail is no long window
    long_before, long_after = windows.flatten()[: 8 * 256].view(8, 256), out.flatten()[: 8 * 256].view(8, 256)
    touched = [w for w in range(8) if not torch.equal(long_before[w], long_after[w])]
    assert len(touched) == 4  # round(0.5 * 8)
    for w in touched:
        start, length, gap = planted_span(long_before[w], long_after[w])
        assert 8 <= length <= LONG_DRILL_MAX_LENGTH and gap >= 256 // 4 and start + 2 * length + gap <= 256
    assert torch.equal(out, plant_long_copies(windows, 256, 0.5, seed=3, vocab=1000, special=[0, 1]))
    assert plant_long_copies(windows, 256, 0.0, seed=3, vocab=1000) is windows
    with pytest.raises(LatentKVError, match="--long-copy-share"):
        plant_long_copies(windows, 256, 1.5, seed=3, vocab=1000)


def test_long_drill_flags_are_checked_before_any_model_loads():
    with pytest.raises(LatentKVError, match="--long-copy-share"):
        small(long_copy_share=1.0, long_seq_len=64, long_every=2)
    with pytest.raises(LatentKVError, match="--long-seq-len"):
        small(long_copy_share=0.5)  # no long windows to plant in
    with pytest.raises(LatentKVError, match="cannot hold"):
        plant_copies(torch.zeros(4, 32, dtype=torch.long), 0.5, seed=0, vocab=100, min_gap=30)


def test_heal_trains_on_long_drills_planted_before_the_short_ones(dirs, tmp_path, tiny_tokenizer):  # noqa: F811
    config = small(long_seq_len=64, long_every=2, long_copy_share=0.5, copy_share=0.25)
    report = heal(dirs / "low", dirs / "src", dirs / "data", tmp_path / "long", config, progress=False)
    plain = pack(tiny_tokenizer, read_documents(dirs / "data"), config.seq_len)
    vocab = min(len(tiny_tokenizer), json.loads((dirs / "src" / "config.json").read_text())["vocab_size"])
    special = tiny_tokenizer.all_special_ids
    long = plant_long_copies(plain, 64, 0.5, config.seed, vocab, special)
    both = plant_copies(long, 0.25, config.seed, vocab, special)
    assert report["data_fingerprint"] == fingerprint(both)
    assert fingerprint(both) not in (fingerprint(plain), fingerprint(plant_copies(plain, 0.25, config.seed, vocab,
                                                                                  special)))

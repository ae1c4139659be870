"""The atomic publish: an output appears whole or not at all, and without --overwrite nothing that is
already at --out (or appears there while we work) is ever replaced."""

from __future__ import annotations

import pytest

from latentkv.errors import LatentKVError
from latentkv.io import atomic
from latentkv.io.atomic import atomic_output_dir, check_output_dir


@pytest.fixture(params=["renameat2", "fallback"])
def kernel(request, monkeypatch):
    """Both ways to publish: renameat2 (Linux), and plain rename where it is missing."""
    if request.param == "fallback":
        monkeypatch.setattr(atomic, "_renameat2", lambda *a: None)
    return request.param


def write(tmp, text):
    (tmp / "model.txt").write_text(text)


def test_output_appearing_during_the_write_is_kept(tmp_path, kernel):
    out = tmp_path / "out"
    with pytest.raises(LatentKVError, match="appeared while this run was writing") as e:
        with atomic_output_dir(out) as tmp:
            write(tmp, "ours")
            out.mkdir()
            (out / "precious.txt").write_text("keep me")  # the race, made deterministic
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.unpublished-")]
    assert len(kept) == 1 and (kept[0] / "model.txt").read_text() == "ours" and str(kept[0]) in str(e.value)
    assert "\n" not in str(e.value)


def test_a_file_appearing_at_out_is_kept(tmp_path, kernel):
    out = tmp_path / "out"
    with pytest.raises(LatentKVError, match="appeared"):
        with atomic_output_dir(out) as tmp:
            write(tmp, "ours")
            out.write_text("a user's file")
    assert out.read_text() == "a user's file"


def test_two_writers_exactly_one_wins(tmp_path, kernel):
    out = tmp_path / "out"
    with pytest.raises(LatentKVError, match="another run with the same --out"):
        with atomic_output_dir(out) as second:
            write(second, "second")
            with atomic_output_dir(out) as first:  # both passed the existence check before either published
                write(first, "first")
    assert (out / "model.txt").read_text() == "first"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_overwrite_replaces_whole(tmp_path, kernel):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as tmp:
        write(tmp, "new")
    assert sorted(p.name for p in out.iterdir()) == ["model.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out) as tmp:
            write(tmp, "half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["same", "inside", "above"])
def test_out_may_not_be_an_input(tmp_path, where):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    out = {"same": src, "inside": src / "sub" / "out", "above": tmp_path}[where]
    with pytest.raises(LatentKVError, match="input"):
        check_output_dir(out, overwrite=True, inputs=(str(src),))
    assert (src / "sub").is_dir()


def test_out_under_a_file_is_refused_early(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(LatentKVError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "file" / "sub", overwrite=False)


def test_exclusive_refuses_a_second_holder(tmp_path):
    lock = tmp_path / ".out.lock"
    with atomic.exclusive(lock, "another run is writing out"):
        with pytest.raises(LatentKVError, match="another run is writing out"):
            with atomic.exclusive(lock, "another run is writing out"):
                pass
    assert not lock.exists()
    with atomic.exclusive(lock, "free again"):  # released: the next run gets it
        pass

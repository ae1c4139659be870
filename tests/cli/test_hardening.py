"""Bad input across every command: one line on stderr, exit 2, nothing half-written, nothing lost.

A matrix: every command that reads a model x {missing, truncated weights, wrong kind of model};
every command that writes an output x {output exists, permission denied}; plus NaN weights and an
interrupted run's leftovers.
"""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from latentkv.cli import main

from conftest import SAMPLE, make_tiny


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_tokenizer):
    """src (HF source), conv (svd 50 %), target (exportable conversion), ds (its DeepSeek-V3 export), text."""
    root = tmp_path_factory.mktemp("hard")
    make_tiny("llama-gqa", layers=2).save_pretrained(root / "src")
    tiny_tokenizer.save_pretrained(root / "src")
    (root / "text.txt").write_text(SAMPLE * 4)
    calib = ["--calib", str(root / "text.txt"), "--calib-samples", "4", "--calib-seq-len", "32"]
    assert main(["convert", str(root / "src"), "--out", str(root / "conv"), "--method", "svd",
                 "--kv-budget", "0.5"]) == 0
    assert main(["convert", str(root / "src"), "--out", str(root / "target"), "--kv-budget", "0.5",
                 "--target", "deepseek_v3", *calib]) == 0
    assert main(["export", str(root / "target"), "--out", str(root / "ds")]) == 0
    return {k: root / k for k in ("src", "conv", "target", "ds")} | {"text": root / "text.txt"}


# command -> (the kind of model it reads, argv with {m} the model, {o} the output, {src}, {text})
COMMANDS = {
    "convert": ("src", ["convert", "{m}", "--out", "{o}", "--method", "svd", "--kv-budget", "0.5"]),
    "convert --stream": ("src", ["convert", "{m}", "--stream", "--method", "svd", "--kv-lora-rank", "16",
                                 "--qk-rope-head-dim", "8", "--out", "{o}"]),
    "sweep": ("src", ["sweep", "{m}", "--out", "{o}", "--budgets", "0.5", "--methods", "svd", "--ppl", "{text}",
                      "--seq-len", "32"]),
    "info": ("conv", ["info", "{m}"]),
    "eval": ("conv", ["eval", "{m}", "--ppl", "{text}", "--seq-len", "32"]),
    "generate": ("conv", ["generate", "{m}", "The quick", "--max-new-tokens", "2"]),
    "bench": ("conv", ["bench", "{m}", "--context", "16", "--batch", "1", "--new-tokens", "2", "--out", "{o}"]),
    "heal": ("conv", ["heal", "{m}", "--teacher", "{src}", "--data", "{text}", "--tokens", "128", "--seq-len", "32",
                      "--batch-size", "2", "--out", "{o}"]),
    "export": ("target", ["export", "{m}", "--out", "{o}"]),
    "verify-export": ("ds", ["verify-export", "{m}", "--against", "{target}", "--tokens", "16"]),
    "load": ("ds", ["load", "{m}", "--out", "{o}"]),
}
WRITERS = [c for c, (_, argv) in COMMANDS.items() if "{o}" in argv]
# what a command given the wrong kind of model must say
WRONG_KIND = {"export": ("src", "converted by latentkv"), "verify-export": ("conv", "cannot load"),
              "load": ("src", "DeepSeek-V3"), "heal": ("src", "conver")}


def run(capsys, command: str, dirs: dict, model, out) -> tuple[int, str]:
    argv = [a.format(m=model, o=out, src=dirs["src"], text=dirs["text"], target=dirs["target"])
            for a in COMMANDS[command][1]]
    code = main(argv)
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str) -> str:
    """The error line, after checking it is the only one that matters (no traceback, exit 2)."""
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def truncated_copy(src, dst):
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_missing_model(capsys, dirs, tmp_path, command):
    line = one_line_error(*run(capsys, command, dirs, tmp_path / "no-such-model", tmp_path / "out"))
    assert "no-such-model" in line and ("not found" in line or "does not exist" in line or "no " in line)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_truncated_weights(capsys, dirs, tmp_path, command):
    bad = truncated_copy(dirs[COMMANDS[command][0]], tmp_path / "bad")
    line = one_line_error(*run(capsys, command, dirs, bad, tmp_path / "out"))
    assert "safetensors" in line and ("truncated" in line or "corrupt" in line or "cannot read" in line), line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("command", sorted(WRONG_KIND))
def test_wrong_kind_of_model(capsys, dirs, tmp_path, command):
    kind, match = WRONG_KIND[command]
    line = one_line_error(*run(capsys, command, dirs, dirs[kind], tmp_path / "out"))
    assert match in line, line


@pytest.mark.parametrize("command", WRITERS)
def test_existing_output_is_kept(capsys, dirs, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    line = one_line_error(*run(capsys, command, dirs, dirs[COMMANDS[command][0]], out))
    assert "already exists" in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("command", WRITERS)
def test_permission_denied(capsys, dirs, tmp_path, monkeypatch, command):
    """Running as root ignores chmod, so the refusal is simulated where every writer must pass: mkdir."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.mkdir

    def denied(path, *a, **k):
        if str(path).startswith(str(locked)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", denied)
    line = one_line_error(*run(capsys, command, dirs, dirs[COMMANDS[command][0]], locked / "out"))
    assert "Permission denied" in line and "locked" in line
    assert not list(locked.iterdir())


@pytest.mark.parametrize("stream", [False, True])
def test_nan_weights_are_refused(capsys, dirs, tmp_path, stream):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(dirs["src"], bad)
    f = next(bad.glob("*.safetensors"))
    tensors = load_file(f)
    tensors["model.layers.1.self_attn.k_proj.weight"][3, 5] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})
    line = one_line_error(*run(capsys, "convert --stream" if stream else "convert", dirs, bad, tmp_path / "out"))
    assert "layer 1" in line and ("NaN" in line or "non-finite" in line), line
    assert not (tmp_path / "out").exists()


def test_killed_conversion_leftovers_are_tidied(capsys, dirs, tmp_path):
    """A kill -9 mid-write leaves `.out.tmp-PID-*`; mid-swap `.out.old-PID-*/out` holding the old output.
    The next run removes the first and puts the second back (then refuses to overwrite it)."""
    dead = 2 ** 22 + 7  # above pid_max's default: no live process has it
    (tmp_path / f".out.tmp-{dead}-abc").mkdir()
    (tmp_path / f".out.tmp-{os.getpid()}-live").mkdir()  # a live writer's: left alone
    (tmp_path / f".out.old-{dead}-xyz" / "out").mkdir(parents=True)
    (tmp_path / f".out.old-{dead}-xyz" / "out" / "model.txt").write_text("old output")
    code, err = run(capsys, "convert", dirs, dirs["src"], tmp_path / "out")
    assert "already exists" in one_line_error(code, err) and "leftover" in err
    assert (tmp_path / "out" / "model.txt").read_text() == "old output"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".out.tmp-{os.getpid()}-live", "out"]
    shutil.rmtree(tmp_path / "out")
    code, err = run(capsys, "convert", dirs, dirs["src"], tmp_path / "out")
    assert code == 0, err
    assert (tmp_path / "out" / "latentkv.json").is_file()


@pytest.mark.parametrize("command", ["convert", "convert --stream", "export", "load", "heal"])
def test_disk_full_while_writing_weights(capsys, dirs, tmp_path, monkeypatch, command):
    """Every weight file goes through safetensors' save_file: a full disk there is one line and leaves
    no output (a streaming conversion keeps its finished layers in OUT.partial to resume)."""
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(a[1] if len(a) > 1 else "weights"))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    line = one_line_error(*run(capsys, command, dirs, dirs[COMMANDS[command][0]], tmp_path / "out"))
    assert "No space left on device" in line and "free disk space" in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("command", WRITERS)
def test_output_appearing_mid_run_is_kept(capsys, dirs, tmp_path, monkeypatch, command):
    """The race of two writers (or a user's mkdir) on one --out, made deterministic: the output appears
    just before the publish. It is left as it was; this run's work is kept beside it, named in the error."""
    import latentkv.conversion.stream_work as stream_work
    from latentkv.io import atomic

    out, real = tmp_path / "out", atomic.publish_dir

    def racing(tmp, target, overwrite=False):
        target.mkdir()
        (target / "precious.txt").write_text("keep me")
        return real(tmp, target, overwrite)

    monkeypatch.setattr(atomic, "publish_dir", racing)
    monkeypatch.setattr(stream_work, "publish_dir", racing)
    line = one_line_error(*run(capsys, command, dirs, dirs[COMMANDS[command][0]], out))
    assert "appeared while this run was writing" in line and "unpublished" in line, line
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
    kept = [p for p in tmp_path.iterdir() if ".unpublished-" in p.name]
    assert len(kept) == 1 and any(kept[0].iterdir()) and str(kept[0]) in line


@pytest.mark.parametrize("command", ["convert", "convert --stream", "export", "load"])
def test_out_is_its_own_input(capsys, dirs, tmp_path, command):
    model = tmp_path / "model"
    shutil.copytree(dirs[COMMANDS[command][0]], model)
    before = sorted(p.name for p in model.iterdir())
    argv = [a.format(m=model, o=model, src=dirs["src"], text=dirs["text"], target=dirs["target"])
            for a in COMMANDS[command][1]]
    line = one_line_error(main(argv + ["--overwrite"]), capsys.readouterr().err)
    assert "input" in line and "another --out" in line, line
    assert sorted(p.name for p in model.iterdir()) == before

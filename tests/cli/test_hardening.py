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
WRONG_KIND = {"export": ("src", "converted by latentkv"), "verify-export": ("conv", "not an export"),
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


def corrupt(record: dict, what: str) -> None:
    """Apply one corruption to latentkv.json's content, in place."""
    if what == "rank":
        record["record"]["layers"][0]["kv_lora_rank"] = 9999
    elif what in ("num_hidden_layers", "hidden_size"):
        record["source_config"][what] = {"num_hidden_layers": "banana", "hidden_size": -4}[what]
    elif what == "layers":
        record["record"]["layers"] = "x"
    elif what == "format_version":
        record["record"]["format_version"] = 99


@pytest.mark.parametrize("what", ["rank", "num_hidden_layers", "hidden_size", "layers", "format_version"])
def test_corrupt_record_is_one_line(capsys, dirs, tmp_path, what):
    import json

    bad = tmp_path / "bad"
    shutil.copytree(dirs["conv"], bad)
    record = json.loads((bad / "latentkv.json").read_text())
    corrupt(record, what)
    (bad / "latentkv.json").write_text(json.dumps(record))
    line = one_line_error(*run(capsys, "eval", dirs, bad, None))
    key = {"rank": "kv_a_proj_with_mqa", "layers": "layers"}.get(what, what)
    assert key in line and ("re-run `latentkv convert`" in line or "upgrade latentkv" in line), line


def test_nan_in_a_converted_checkpoint_is_refused_at_load(capsys, dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(dirs["conv"], bad)
    f = bad / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.kv_b_proj.weight"][0, 0] = float("inf")
    save_file(tensors, f, metadata={"format": "pt"})
    for command in ("eval", "generate"):
        line = one_line_error(*run(capsys, command, dirs, bad, None))
        assert "model.layers.0.self_attn.kv_b_proj.weight" in line and "NaN or Inf" in line, line


@pytest.mark.parametrize("out", ["/proc/latentkv-x", "{file}/sub"])
def test_unusable_out_refused_before_work(capsys, dirs, tmp_path, monkeypatch, out):
    import latentkv.cli.commands as commands

    monkeypatch.setattr(commands, "load_model", lambda *a, **k: pytest.fail("loaded before checking --out"))
    (tmp_path / "file").write_text("x")
    line = one_line_error(*run(capsys, "convert", dirs, dirs["src"], out.format(file=tmp_path / "file")))
    assert "--out" in line and "free disk space" not in line, line
    assert (tmp_path / "file").read_text() == "x"


def test_read_only_is_not_told_to_free_disk_space():
    from latentkv.errors import write_error

    assert "free disk space" not in write_error(OSError(errno.EROFS, os.strerror(errno.EROFS), "/ro/out"))
    assert "free disk space" in write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/full/out"))


@pytest.mark.parametrize("argv, match", [
    (["eval", "{m}", "--ppl", "{text}", "--max-windows", "0"], "--max-windows"),
    (["eval", "{m}", "--ppl", "{text}", "--seq-len", "10000000"], "positions"),
    (["generate", "{m}", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "{m}", "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", "{m}", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "{m}", "--batch-file", "{binary}"], "not UTF-8"),
])
def test_bad_eval_and_generate_arguments(capsys, dirs, tmp_path, argv, match):
    (tmp_path / "bin").write_bytes(bytes(range(256)) * 8)
    argv = [a.format(m=dirs["conv"], text=dirs["text"], binary=tmp_path / "bin") for a in argv]
    assert match in one_line_error(main(argv), capsys.readouterr().err)


@pytest.mark.parametrize("flags, match", [
    (["--kv-lora-rank", "100000", "--qk-rope-head-dim", "8"], "--kv-lora-rank 100000"),
    (["--kv-budget", "0.001"], "values per token"),
    (["--kv-lora-rank", "16", "--qk-rope-head-dim", "7"], "--qk-rope-head-dim 7"),
])
def test_limits_refused_before_calibration(capsys, dirs, tmp_path, monkeypatch, flags, match):
    import latentkv.conversion.dispatch as dispatch

    monkeypatch.setattr(dispatch, "calibration_ids", lambda *a, **k: pytest.fail("calibrated before checking"))
    code = main(["convert", str(dirs["src"]), "--out", str(tmp_path / "out"), "--calib", str(dirs["text"]), *flags])
    line = one_line_error(code, capsys.readouterr().err)
    assert match in line and "= 2" not in line, line
    assert not (tmp_path / "out").exists()


def test_stream_reads_embeddings_saved_once_as_lm_head(capsys, dirs, tmp_path, tiny_tokenizer):
    """safetensors' save_model (and our GGUF cache) keeps one name of a tied pair: lm_head.weight."""
    import json

    from safetensors.torch import save_model

    from conftest import make_tiny

    tied = tmp_path / "tied"
    model = make_tiny("llama-gqa", layers=2, tie_word_embeddings=True)
    model.config.save_pretrained(tied)
    tiny_tokenizer.save_pretrained(tied)
    save_model(model, str(tied / "model.safetensors"))
    code, err = run(capsys, "convert --stream", dirs, tied, tmp_path / "out")
    assert code == 0, err
    assert main(["convert", str(tied), "--out", str(tmp_path / "mem"), "--method", "svd", "--kv-lora-rank", "16",
                 "--qk-rope-head-dim", "8", "-q"]) == 0
    capsys.readouterr()
    ppl = {}
    for name in ("out", "mem"):  # streamed and in memory: the same model
        assert main(["eval", str(tmp_path / name), "--ppl", str(dirs["text"]), "--seq-len", "32", "--json", "-q"]) == 0
        ppl[name] = json.loads(capsys.readouterr().out)["ppl"]
    assert ppl["out"] == pytest.approx(ppl["mem"], rel=1e-5)
    assert not (tmp_path / "out.partial").exists()


def test_demo_bad_budget_says_nothing_else(capsys):
    code = main(["demo", "--kv-budget", "0"])
    err = capsys.readouterr().err
    assert one_line_error(code, err) and err.strip().startswith("error:") and "--kv-budget" in err


def test_convert_prints_split_search_as_a_table(capsys, dirs, tmp_path):
    assert main(["convert", str(dirs["src"]), "--out", str(tmp_path / "out"), "--kv-budget", "0.5", "--calib",
                 str(dirs["text"]), "--calib-samples", "4", "--calib-seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "<- chosen" in out and "held-out NLL" in out and "{'" not in out
    assert main(["convert", str(dirs["src"]), "--out", str(tmp_path / "fixed"), "--kv-lora-rank", "16",
                 "--qk-rope-head-dim", "8", "--target", "deepseek_v3", "--calib", str(dirs["text"]),
                 "--calib-samples", "4", "--calib-seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "split search: not run" in out and "latent norm: fitted" in out and "{'" not in out


def test_verify_export_shows_progress(capsys, dirs):
    assert main(["verify-export", str(dirs["ds"]), "--against", str(dirs["target"]), "--tokens", "16"]) == 0
    assert "verify-export" in capsys.readouterr().err


def test_first_line_quotes_one_line_of_a_deep_error():
    from latentkv.errors import first_line

    assert first_line(ValueError("bad shape\n  at frame 1\n  at frame 2")) == "bad shape"
    assert first_line(KeyError()) == "KeyError"  # says nothing: its type
    assert first_line(OSError("x" * 500), 120) == "x" * 120


@pytest.mark.parametrize("verbose", [False, True])
def test_hub_request_noise_stays_out_of_the_one_line_error(capsys, monkeypatch, verbose):
    """The hub client logs each failed request before raising; the error line already says what failed."""
    import logging

    from latentkv import LatentKVError
    from latentkv.cli import commands

    def fail(a):
        logging.getLogger("huggingface_hub.utils._http").warning("'[Errno -2]' thrown while requesting HEAD x")
        raise LatentKVError("could not load model 'x'; pass a local HF directory")

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    seen, hub, collect = [], logging.getLogger("huggingface_hub"), Collect()
    before = hub.level
    hub.addHandler(collect)
    monkeypatch.setattr(commands, "info_cmd", fail)
    try:
        code = main(["info", "x", *(["--verbose"] if verbose else [])])
    finally:
        hub.removeHandler(collect)
    assert code == 2 and one_line_error(code, capsys.readouterr().err).startswith("error: could not load")
    assert len(seen) == verbose and hub.level == before  # shown only with --verbose; the level is put back

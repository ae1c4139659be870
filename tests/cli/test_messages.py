"""Where messages go: the library logs (`latentkv` logger) and warns, the CLI prints them to stderr at the
level -q/-v choose, results stay on stdout, and nothing is left changed after a command."""

import json
import logging
import subprocess
import sys

import pytest

from latentkv import LowRankConfig, convert
from latentkv.cli import main

from conftest import make_tiny


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("src") / "tiny"
    make_tiny("llama-gqa", layers=3).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def convert_cli(capsys, source_dir, out, *flags):
    code = main(["convert", str(source_dir), "--out", str(out), "--kv-budget", "0.5", "--calib-samples", "4",
                 "--json", *flags])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    return json.loads(stdout), stderr


def test_default_shows_progress_and_notes_quiet_does_not(capsys, source_dir, tmp_path):
    loud, err = convert_cli(capsys, source_dir, tmp_path / "a")
    assert "search split" in err and "split for 32 values/token" in err  # a bar and an INFO note
    quiet, err = convert_cli(capsys, source_dir, tmp_path / "b", "-q")
    assert err == ""
    assert quiet.keys() == loud.keys() and quiet["kv_lora_rank"] == loud["kv_lora_rank"]


def test_verbose_adds_debug_lines(capsys, source_dir, tmp_path):
    _, err = convert_cli(capsys, source_dir, tmp_path / "a", "-v")
    assert "converted 3 layers with lowrank" in err


def test_warnings_print_as_one_line_even_when_quiet(capsys, source_dir, tmp_path):
    _, err = convert_cli(capsys, source_dir, tmp_path / "a", "-q", "--target", "deepseek_v3")
    assert err.startswith("warning: kv_lora_rank") and len(err.strip().splitlines()) == 1


def test_cli_leaves_logging_and_warnings_as_it_found_them(capsys, source_dir, tmp_path):
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("latentkv")
    state = lambda: (logger.level, list(logger.handlers), logger.propagate, hf_logging.is_progress_bar_enabled())  # noqa: E731
    before = state()
    convert_cli(capsys, source_dir, tmp_path / "a", "-v")
    assert state() == before
    assert main(["convert", str(source_dir), "--out", str(tmp_path / "a"), "-q"]) == 2  # exists: an error path
    assert state() == before


def test_the_library_prints_nothing_without_progress(capsys, tiny_tokenizer):
    """API users silence it with progress=False: notes go to the logger, which has no handler by default."""
    from conftest import SAMPLE

    ids = tiny_tokenizer(SAMPLE, return_tensors="pt").input_ids[:, :192].view(6, 32)
    convert(make_tiny("llama-gqa"), LowRankConfig(kv_budget=0.5), calib_ids=ids, progress=False)
    assert capsys.readouterr().err == ""


def test_python_dash_m_latentkv():
    done = subprocess.run([sys.executable, "-m", "latentkv", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "convert" in done.stdout and "accelerate-config" in done.stdout

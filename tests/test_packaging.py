"""The wheel works on its own: built from the repository, installed into a fresh virtualenv with its
declared dependencies only, run from a folder with no repository, no ../shared and no `datasets`,
it converts a tiny local model (calibrating on the domains this machine has: the packaged fiction sample,
the standard library, the installed READMEs) and reports the cache saving."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, **kw):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the wheel installed (torch pinned to the local CPU build, as the Makefile does)."""
    tmp = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist", ROOT])
    wheel = next((tmp / "dist").glob("latentkv-*.whl"))
    run([sys.executable, "-m", "venv", tmp / "venv"])
    py = tmp / "venv" / "bin" / "python"
    run([py, "-m", "pip", "install", "-q", "-c", ROOT / "constraints" / "cpu.txt", wheel], timeout=1500)
    return tmp, py


def test_wheel_converts_and_reports_without_the_repository(installed, tiny_tokenizer):
    tmp, py = installed
    model = make_tiny("llama-gqa")
    model.save_pretrained(tmp / "tiny")
    tiny_tokenizer.save_pretrained(tmp / "tiny")
    work = tmp / "work"  # ../shared does not exist from here
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cli = [py, "-m", "latentkv"]
    where = run([py, "-c", "import latentkv; print(latentkv.__file__)"], cwd=work, env=env).stdout
    assert str(tmp / "venv") in where and str(ROOT) not in where
    done = run([*cli, "convert", tmp / "tiny", "--kv-budget", "0.5", "--out", work / "out", "--json"], cwd=work, env=env)
    out = json.loads(done.stdout)
    assert out["method"] == "lowrank" and out["ratio"] == pytest.approx(0.5, abs=0.05)
    meta = json.loads((work / "out" / "latentkv.json").read_text())
    calibration = meta["record"]["calibration"]  # the default mixture, from what this machine has
    assert meta["record"]["conversion"]["calib"] == "mix" and calibration["text"] == "mix"
    assert set(calibration["components"]) == {"fiction", "code", "docs", "repeats"}  # fiction: the packaged sample
    assert "no wikitext2 text here" in done.stderr
    info = json.loads(run([*cli, "info", work / "out", "--json"], cwd=work, env=env).stdout)
    assert info["ratio"] == pytest.approx(out["ratio"]) and info["record"]["layers"]
    path = run([tmp / "venv" / "bin" / "latentkv", "accelerate-config", "fsdp-8gpu"], cwd=work, env=env).stdout.strip()
    assert Path(path).is_file() and "fsdp" in Path(path).read_text().lower()


def test_gpu_check_skips_cleanly_without_gpu():
    import subprocess
    import sys
    from pathlib import Path

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script runs for real there")
    script = Path(__file__).parents[1] / "scripts" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PYTHON": sys.executable,
                                                                                      "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout.strip() == "skipped: no CUDA GPU on this machine", done.stderr

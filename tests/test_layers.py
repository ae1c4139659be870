"""The package keeps its layers: the import-linter contract holds, no import cycle (deferred imports
included), no import inside a function but of an optional heavy dependency, no `_private` name
reached across modules (scripts/module_graph.py)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contract_is_kept():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(lint).exists():
        pytest.fail("lint-imports is missing: pip install -e '.[test]'")
    done = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "1 kept, 0 broken" in done.stdout, done.stdout[-3000:]


def test_no_cycles_no_deferred_internal_imports_no_private_reach():
    done = subprocess.run([sys.executable, "scripts/module_graph.py"], cwd=ROOT, capture_output=True, text=True)
    out = done.stdout
    assert done.returncode == 0, out
    assert "cycles: 0" in out and "back-imports against the contract (8 layers): 0" in out
    assert "(of which deferred, inside a function: 0)" in out and "private names imported across modules: 0" in out


def test_function_level_imports_are_only_optional_heavy_dependencies():
    import ast

    allowed = {"matplotlib", "peft", "datasets", "lm_eval", "vllm", "importlib"}
    found = []
    for path in sorted((ROOT / "latentkv").rglob("*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Import):
                        found += [(path.name, a.name) for a in node.names]
                    elif isinstance(node, ast.ImportFrom):
                        found.append((path.name, "." * node.level + (node.module or "")))
    assert [f for f in found if f[1].split(".")[0] not in allowed] == []


def test_importing_the_package_loads_nothing_heavy():
    code = "import sys, latentkv; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"

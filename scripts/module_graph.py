"""Counts of latentkv's internal import graph: modules, edges, layers, cycles, back-imports.

    python scripts/module_graph.py [--package latentkv]

Reads the source with `ast` (nothing is imported). An edge is any import of one latentkv module by
another, at module level or inside a function ("deferred"). Reported:
- modules, edges, deferred edges (imports inside functions), and how many of those are not of an
  optional heavy dependency;
- cycles: strongly connected groups of modules (deferred imports included, since they still cycle);
- layers: the longest chain of imports in the graph with cycles collapsed;
- back-imports: edges that point up the contract in pyproject.toml ([tool.importlinter]);
- private reach: a `_name` imported from another module.
"""

from __future__ import annotations

import argparse
import ast
import sys
import tomllib
from pathlib import Path


def modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def resolve(name: str, level: int, current: str, is_pkg: bool) -> str:
    if level == 0:
        return name
    base = current.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def edges(mods: dict[str, Path], package: str) -> list[tuple[str, str, bool, list[str]]]:
    """-> (importer, imported module, deferred, names imported)."""
    out = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text())
        is_pkg = path.name == "__init__.py"
        for node, deferred in _imports(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    target = _known(a.name, mods)
                    if target and target != mod:
                        out.append((mod, target, deferred, []))
                continue
            base = resolve(node.module or "", node.level, mod, is_pkg)
            if not base.startswith(package):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                target = sub if sub in mods else _known(base, mods)
                if target and target != mod:
                    out.append((mod, target, deferred, [] if sub in mods else [a.name]))
    return out


def _imports(tree):
    def walk(node, deferred):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, deferred
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            yield from walk(child, inner)
    yield from walk(tree, False)


def _known(name: str, mods: dict) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def sccs(nodes, graph) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on:
                    low[v] = min(low[v], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                out.append(sorted(comp))
    return out


def depth(nodes, graph, comps) -> int:
    """Longest import chain (in modules) once each cycle is collapsed to one node."""
    comp_of = {m: i for i, c in enumerate(comps) for m in c}
    dag = {}
    for a in nodes:
        for b in graph.get(a, ()):
            if comp_of[a] != comp_of[b]:
                dag.setdefault(comp_of[a], set()).add(comp_of[b])
    memo = {}

    def longest(c):
        if c not in memo:
            memo[c] = 1 + max((longest(d) for d in dag.get(c, ())), default=0)
        return memo[c]

    return max((longest(c) for c in range(len(comps))), default=0)


def contract_layers(pyproject: Path) -> list[list[str]]:
    if not pyproject.is_file():
        return []
    cfg = tomllib.loads(pyproject.read_text()).get("tool", {}).get("importlinter", {})
    for c in cfg.get("contracts", []):
        if c.get("type") == "layers":
            return [[p.strip() for p in layer.split("|")] for layer in c["layers"]]
    return []


def layer_of(mod: str, layers: list[list[str]]) -> int | None:
    for i, layer in enumerate(layers):
        if any(mod == p or mod.startswith(p + ".") for p in layer):
            return i
    return None


OPTIONAL_HEAVY = ("matplotlib", "peft", "lm_eval", "vllm")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", default="latentkv")
    ap.add_argument("--root", default=".", help="repository root (holds the package and pyproject.toml)")
    ap.add_argument("--contract", help="a TOML file with the [tool.importlinter] contract (default: pyproject.toml)")
    a = ap.parse_args()
    root = Path(a.root)
    mods = modules(root / a.package, a.package)
    es = edges(mods, a.package)
    graph = {}
    for src, dst, _, _ in es:
        graph.setdefault(src, set()).add(dst)
    comps = sccs(list(mods), graph)
    cycles = [c for c in comps if len(c) > 1]
    layers = contract_layers(Path(a.contract) if a.contract else root / "pyproject.toml")
    back = [(s, d) for s, d, _, _ in es
            if layer_of(s, layers) is not None and layer_of(d, layers) is not None
            and layer_of(d, layers) < layer_of(s, layers)]
    private = sorted({(s, d, n) for s, d, _, names in es for n in names
                      if n.startswith("_") and not n.startswith("__")})
    pairs = {(s, d) for s, d, _, _ in es}
    deferred = sorted({(s, d) for s, d, df, _ in es if df})
    print(f"modules: {len(mods)} ({sum(1 for p in mods.values() if p.name == '__init__.py')} packages)")
    print(f"import edges: {len(pairs)} (of which deferred, inside a function: {len(deferred)})")
    print(f"layers (longest import chain, cycles collapsed): {depth(list(mods), graph, comps)}")
    print(f"cycles: {len(cycles)}" + "".join(f"\n  {' <-> '.join(c)}" for c in cycles))
    print(f"back-imports against the contract ({len(layers)} layers): {len(set(back))}"
          + "".join(f"\n  {s} -> {d}" for s, d in sorted(set(back))))
    print(f"private names imported across modules: {len(private)}"
          + "".join(f"\n  {s} <- {d}.{n}" for s, d, n in private))
    return 1 if cycles or back or private else 0


if __name__ == "__main__":
    sys.exit(main())

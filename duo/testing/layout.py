"""The code's layout, read with `ast`: the import graph between duo's modules, cycles, sizes, long functions.

    python -m duo.testing.layout          the graph (each module: what it imports), line counts, the
                                          longest functions, and any cycle

Every import counts, a lazy one inside a function too: a cycle hidden in a function is still a cycle.
tests/test_layout.py holds the rules (no cycle, the profiler never imports the engine, the library
never imports bench/, no module over MAX_LINES).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("duo", "bench")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _absolute(name: str, level: int, here: str, is_package: bool) -> str:
    if level == 0:
        return name
    base = here.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The duo / bench modules `path` imports (from X import Y counts X.Y when it is a module)."""
    here = module_name(path)
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _absolute(node.module or "", node.level, here, path.name == "__init__.py")
            names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != here:
                out.add(n)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) for m, p in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def line_counts() -> dict[str, int]:
    return {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in modules().items()}


def longest_functions(n: int = 5, package: str = "duo") -> list[tuple[int, str]]:
    """(lines, module:function) of the n longest functions and methods."""
    out = []
    for m, p in modules().items():
        if not (m == package or m.startswith(package + ".")):
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((node.end_lineno - node.lineno + 1, f"{m}:{node.name}"))
    return sorted(out, reverse=True)[:n]


def main() -> int:
    g = graph()
    counts = line_counts()
    for m in sorted(g):
        deps = ", ".join(sorted(d.replace("duo.", "") for d in g[m])) or "-"
        print(f"{counts[m]:5d}  {m:34} -> {deps}")
    print("\nlongest functions (duo):")
    for lines, name in longest_functions(8):
        print(f"{lines:5d}  {name}")
    cyc = cycles(g)
    print("\ncycles:", "none" if not cyc else "; ".join(" <-> ".join(c) for c in cyc))
    return 1 if cyc else 0


if __name__ == "__main__":
    sys.exit(main())

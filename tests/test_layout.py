"""The layout rules of the code base (issue: one clear house), checked on the source with `ast`."""
from duo.testing import layout


def test_no_import_cycle():
    """Every import counts, lazy ones inside functions too."""
    assert layout.cycles(layout.graph()) == []


def test_the_profiler_never_imports_the_engine_and_the_library_never_imports_bench():
    g = layout.graph()
    for mod, deps in g.items():
        if mod.startswith("duo.profiler"):
            assert "duo.engine" not in deps, mod
        if mod == "duo" or mod.startswith("duo."):
            assert not [d for d in deps if d == "bench" or d.startswith("bench.")], mod


def test_the_draft_worker_process_imports_no_torch_module():
    """The worker (llama.cpp) is spawned without torch: nothing it imports may import duo's torch modules."""
    g = layout.graph()
    seen, todo = set(), ["duo.runtime.draft_worker"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += g.get(m, ())
    assert not seen & {"duo.runtime.target", "duo.sampling", "duo.engine", "duo.runtime.decode"}, sorted(seen)


def test_no_module_over_the_limit():
    big = {m: n for m, n in layout.line_counts().items() if n > layout.MAX_LINES}
    assert big == {}, f"modules over {layout.MAX_LINES} lines: {big}"

"""Draft worker: KV rollback correctness against a fresh llama.cpp, tree shapes, overlap,
channel latency and process / shared-memory life cycle."""
from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

psutil = pytest.importorskip("psutil")
llama_cpp = pytest.importorskip("llama_cpp")

from duo.runtime.channel import measure_round_trip  # noqa: E402
from duo.plan import TreeSpec  # noqa: E402
from duo.runtime.draft_client import DraftClient, DraftConfig, DraftDied, DraftError, DraftTimeout  # noqa: E402
from duo.runtime.tree_shapes import split_budget  # noqa: E402
from duo.runtime.tree import Tree  # noqa: E402
from duo.testing.procs import gone

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def draft_gguf(request):
    """The tiny F32 draft; tests parametrized with ``QUANT`` also run on the Q4_0 draft
    (quantized kernels, weights in llama.cpp's CPU_REPACK / AMX extra buffer type)."""
    if getattr(request, "param", "f32") == "f32":
        return str(request.getfixturevalue("tiny_pair").draft_gguf)
    request.getfixturevalue("extra_bufts_run")  # skips where they crash: `ref` loads it in this process
    return str(request.getfixturevalue("tiny_pair_q").draft_gguf)


# For the key correctness tests: also on the quantized draft (`draft_gguf` is parametrized indirectly).
QUANT = pytest.mark.parametrize("draft_gguf", ["f32", "q4_0"], indirect=True)


@functools.lru_cache(maxsize=None)
def is_quantized(path: str) -> bool:
    import gguf

    return any(t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
               for t in gguf.GGUFReader(path).tensors)


class ProbCheck:
    """Worker probabilities against a fresh llama.cpp evaluation of the same prefix.

    F32 draft: every one within ``tol``. Quantized draft: llama.cpp quantizes the activations to
    int8 blocks before each quantized matmul, so the tiny float differences a different KV-cell
    layout makes (the worker's cache after rollbacks and forks vs a fresh one) mostly vanish --
    worker and fresh model agree to ~1e-8 -- but a value on a rounding boundary occasionally flips
    by one step and moves a probability by up to a few 1e-2 (seen: 1 node in ~130 moved by 0.022;
    replaying the worker's exact KV operations on an F32 copy of the same weights gives 6e-4 there,
    so the cache is right). Hence a few outliers (each under ``outlier_tol``; at most one, or
    ``max_outliers`` of all) are allowed, while a real bug (wrong cells or positions: most
    probabilities off) still fails.
    """

    def __init__(self, draft_gguf: str, tol: float = 1e-3):
        self.tol = tol
        self.outlier_tol = 5e-2 if is_quantized(draft_gguf) else None
        self.max_outliers = 0.05
        self.n = 0
        self.outliers: list = []

    def close(self, got: float, want: float, what="") -> bool:
        """Check one probability; True when it is within ``tol`` (not an outlier)."""
        self.n += 1
        err = abs(float(got) - float(want))
        if err < self.tol:
            return True
        assert self.outlier_tol is not None and err < self.outlier_tol, (what, float(got), float(want))
        self.outliers.append((what, err))
        return False

    def top(self, tokens, p, what="") -> None:
        """``tokens`` are the len(tokens) most probable under ``p`` (up to swaps at outlier-sized ties)."""
        k = len(tokens)
        ranked = np.argsort(-p, kind="stable")[:k]
        if sorted(tokens) == sorted(ranked.tolist()):
            return
        assert self.outlier_tol is not None, (what, sorted(tokens), sorted(ranked.tolist()))
        kth = p[ranked[-1]]
        assert all(p[t] > kth - self.outlier_tol for t in tokens), (what, sorted(tokens), sorted(ranked.tolist()))
        self.outliers.append((what, "rank"))

    def done(self) -> None:
        if self.outliers:
            print(f"\n{len(self.outliers)} of {self.n} probabilities off by more than {self.tol}: {self.outliers}")
        assert len(self.outliers) <= max(1.0, self.max_outliers * self.n), self.outliers


@pytest.fixture(scope="module")
def ref(draft_gguf):
    """A fresh llama.cpp model on the same GGUF, evaluated from scratch for every prefix."""
    llm = llama_cpp.Llama(model_path=draft_gguf, n_ctx=1024, n_batch=256, logits_all=True, n_threads=1,
                          n_gpu_layers=0, verbose=False)
    yield Ref(llm)
    llm.close()


class Ref:
    def __init__(self, llm):
        self.llm = llm
        self.n_vocab = llm.n_vocab()

    def logits(self, tokens) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(list(tokens))
        return np.array(self.llm.scores[self.llm.n_tokens - 1])

    def probs(self, tokens) -> np.ndarray:
        x = self.logits(tokens).astype(np.float64)
        e = np.exp(x - x.max())
        return e / e.sum()

    def greedy(self, tokens, n) -> list[int]:
        self.llm.reset()
        self.llm.eval(list(tokens))
        out = []
        for _ in range(n):
            t = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(t)
            self.llm.eval([t])
        return out


def cfg(path, **kw) -> DraftConfig:
    if is_quantized(path):  # the worker on the kernels `ref` runs: llama.cpp's default, repacked weights
        kw.setdefault("extra_bufts", True)
    return DraftConfig(gguf_path=path, n_threads=1, n_ctx=1024, max_nodes=64, max_seqs=8, load_timeout_s=60, **kw)


def my_segments() -> list[str]:
    return sorted(p for p in os.listdir("/dev/shm") if p.startswith(f"duo_{os.getpid()}_"))


def assert_clean(pid: int) -> None:
    assert gone(pid), f"draft worker {pid} still running"
    assert pid not in [c.pid for c in psutil.Process().children(recursive=True)]
    assert my_segments() == []


def same_tree(a: Tree, b: Tree, atol: float = 1e-4) -> None:
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.parents, b.parents)
    np.testing.assert_allclose(a.probs, b.probs, atol=atol)


def path_tokens(tree: Tree, i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(int(tree.tokens[i]))
        i = int(tree.parents[i])
    return out[::-1]


# ------------------------------------------------------------------------------------ KV cache
@QUANT
def test_chain_equals_fresh_greedy_across_rollbacks(draft_gguf, ref):
    rng = np.random.default_rng(0)
    V = ref.n_vocab
    prompt = rng.integers(3, V, 24).tolist()
    committed = list(prompt)
    budget = 6
    bound = len(prompt)  # tokens a prefix-reusing worker may decode at most
    check = ProbCheck(draft_gguf, tol=2e-3)
    with DraftClient(cfg(draft_gguf)) as c:
        c.start(prompt, overlap=False)
        delta: list[int] = []
        for r in range(10):
            tree = c.request_tree(delta, TreeSpec(budget, 1, "chain"), timeout=30)
            committed += delta
            bound += len(delta) + 1 + budget
            expect = ref.greedy(committed, budget)
            assert tree.tokens.tolist() == expect, f"round {r}"
            check.close(tree.probs[0], ref.probs(committed)[expect[0]], r)  # f16 KV, batch-shape rounding
            kind = r % 3
            if kind == 0:    # accept a prefix, then the target's own (different) token
                k = int(rng.integers(0, budget))
                bad = (expect[k] + 1 + int(rng.integers(0, V - 4))) % V
                delta = expect[:k] + [bad]
            elif kind == 1:  # accept everything plus a bonus
                delta = expect + [int(rng.integers(0, V))]
            else:            # something unrelated
                delta = rng.integers(0, V, int(rng.integers(1, 5))).tolist()
        st = c.stats
    check.done()
    assert st.rollbacks >= 5
    assert 0 < st.n_decoded <= bound, (st.n_decoded, bound)
    assert st.n_requests == 10


def test_timeout_keeps_delta_semantics(draft_gguf, ref):
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, ref.n_vocab, 300).tolist()
    with DraftClient(cfg(draft_gguf)) as c:
        c.start(prompt, overlap=False)
        with pytest.raises(DraftTimeout):  # the START prefill is still running
            c.request_tree([], TreeSpec(8, 1, "chain"), timeout=1e-4)
        extra = [5, 6, 7]
        tree = c.request_tree(extra, TreeSpec(8, 1, "chain"), timeout=30)
        assert tree.tokens.tolist() == ref.greedy(prompt + extra, 8)


# ------------------------------------------------------------------------------------ shapes
@QUANT
@pytest.mark.parametrize("shape", ["dynamic", "eagle"])
def test_tree_shapes_are_valid_and_match_fresh_probs(draft_gguf, ref, shape):
    rng = np.random.default_rng(2)
    V = ref.n_vocab
    prompt = rng.integers(3, V, 16).tolist()
    committed = list(prompt)
    check = ProbCheck(draft_gguf)
    with DraftClient(cfg(draft_gguf)) as c:
        c.start(prompt, overlap=False)
        delta: list[int] = []
        for r, (budget, width) in enumerate([(12, 4), (1, 4), (16, 2), (10, 1), (20, 8), (7, 3)]):
            tree = c.request_tree(delta, TreeSpec(budget, width, shape), timeout=30)
            committed += delta
            tree.validate(V)
            assert 1 <= len(tree) <= budget
            kids = tree.children()
            assert len(kids[0]) <= width
            if shape == "dynamic":
                assert all(len(k) <= 1 for k in kids[1:]), "dynamic branches are chains"
                greedy = ref.greedy(committed, 1)
                assert int(tree.tokens[kids[0][0]]) == greedy[0]
            else:
                assert all(len(k) <= width for k in kids)
                assert len(tree) == budget
            # every node's probability is the fresh model's conditional probability of its token
            for i in range(len(tree)):
                p = ref.probs(committed + path_tokens(tree, i)[:-1])
                check.close(tree.probs[i], p[tree.tokens[i]], (r, i))
                sib = kids[int(tree.parents[i]) + 1]
                if shape == "eagle" or tree.parents[i] >= 0:  # children are the top tokens, best first
                    check.top([int(tree.tokens[j]) for j in sib], p, (r, i))
            # accept part of the top path, then a random target token
            path = tree.top_path()
            k = int(rng.integers(0, len(path) + 1))
            delta = [int(tree.tokens[j]) for j in path[:k]] + [int(rng.integers(0, V))]
    check.done()


def test_dynamic_branching_rule(draft_gguf, ref):
    """Branches open exactly on first-position tokens with p > p1 * p2."""
    rng = np.random.default_rng(3)
    with DraftClient(cfg(draft_gguf)) as c:
        for trial in range(4):
            prompt = rng.integers(3, ref.n_vocab, 12).tolist()
            c.start(prompt, overlap=False)
            tree = c.request_tree([], TreeSpec(16, 4, "dynamic"), timeout=30)
            p = ref.probs(prompt)
            top = np.argsort(-p, kind="stable")[:4]
            p1 = p[top[0]]
            p2 = ref.probs(prompt + [int(top[0])]).max()
            n_branch = int(1 + np.sum(p[top[1:]] > p1 * p2))
            assert len(tree.children()[0]) == n_branch


def test_split_budget():
    assert split_budget(10, [1.0]) == [10]
    assert sum(split_budget(16, [0.5, 0.3, 0.1, 0.1])) == 16
    assert split_budget(4, [0.9, 0.05, 0.03, 0.02]) == [1, 1, 1, 1]
    assert split_budget(12, [0.6, 0.2, 0.2]) == [6, 3, 3]  # 1 each + 9 * w = 5.4, 1.8, 1.8


# ------------------------------------------------------------------------------------ overlap
@QUANT
@pytest.mark.parametrize("shape,width", [("chain", 1), ("dynamic", 4), ("eagle", 3)])
def test_overlap_hits_equal_fresh_trees(draft_gguf, ref, shape, width):
    rng = np.random.default_rng(4)
    prompt = rng.integers(3, ref.n_vocab, 20).tolist()
    budget = 10
    with DraftClient(cfg(draft_gguf)) as a, DraftClient(cfg(draft_gguf)) as b:
        a.start(prompt, overlap=True, spec=TreeSpec(budget, width, shape))
        b.start(prompt, overlap=False)
        committed = list(prompt)
        delta = ref.greedy(committed, 1)   # the target's first token, from its prefill: the draft guessed it
        expected_hits = 0
        for r in range(6):
            if r % 2:
                time.sleep(0.2)  # let the worker finish the prepared tree (else: finish on request)
            ta = a.request_tree(delta, TreeSpec(budget, width, shape), timeout=30)
            tb = b.request_tree(delta, TreeSpec(budget, width, shape), timeout=30)
            committed += delta
            # same tokens and shape; the probabilities within 1e-3: drafted ahead, the root and the first
            # token are decoded in batches of 1 (the first token was a guess), fresh in one batch of 2
            same_tree(ta, tb, atol=1e-3)
            path = [int(ta.tokens[i]) for i in ta.top_path()]
            if r == 3:  # the target disagrees: a miss
                delta = path[:1] + [(ref.greedy(committed + path[:1], 1)[0] + 1) % ref.n_vocab]
            else:       # the target takes the top path and the draft's own next token
                delta = path + ref.greedy(committed + path, 1)
                expected_hits += 1
        st = a.stats
    assert st.overlap_hits >= expected_hits  # the first request (the first token) is a hit too
    assert st.overlap_misses >= 1
    assert b.stats.overlap_hits == 0


# ------------------------------------------------------------------------------------ channel
def test_ping_round_trip(draft_gguf):
    with DraftClient(cfg(draft_gguf)) as c:
        rt = np.array([c.ping() for _ in range(200)])
    med = np.median(rt)
    print(f"\nworker ping round trip: median {med * 1e6:.1f} us, p90 {np.percentile(rt, 90) * 1e6:.1f} us")
    assert med < 2e-3
    assert np.median(measure_round_trip(100)) < 2e-3


def test_worker_reports_errors_and_recovers(draft_gguf, ref):
    prompt = [5, 6, 7, 8]
    with DraftClient(cfg(draft_gguf)) as c:
        c.start(prompt, overlap=False)
        with pytest.raises(DraftError, match="out of range"):
            c.request_tree([ref.n_vocab + 5], TreeSpec(4, 1, "chain"), timeout=30)
        with pytest.raises(ValueError):
            c.request_tree([], TreeSpec(1000, 1, "chain"), timeout=30)
        tree = c.request_tree([9], TreeSpec(4, 1, "chain"), timeout=30)
        assert tree.tokens.tolist() == ref.greedy(prompt + [9], 4)
        assert c.alive()


# ------------------------------------------------------------------------------------ life cycle
def test_close_leaves_nothing(draft_gguf):
    c = DraftClient(cfg(draft_gguf))
    pid = c.worker_pid
    assert psutil.pid_exists(pid) and len(my_segments()) == 1
    c.close()
    c.close()
    assert not c.alive()
    assert_clean(pid)


def test_exception_inside_with_leaves_nothing(draft_gguf):
    with pytest.raises(KeyError):
        with DraftClient(cfg(draft_gguf)) as c:
            pid = c.worker_pid
            c.start([1, 2, 3], overlap=True)
            raise KeyError("boom")
    assert_clean(pid)


def test_sigkilled_worker_raises_promptly(draft_gguf):
    c = DraftClient(cfg(draft_gguf))
    pid = c.worker_pid
    c.start([1, 2, 3, 4], overlap=False)
    c.request_tree([], TreeSpec(4, 1, "chain"), timeout=30)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(DraftDied):
        c.request_tree([5], TreeSpec(4, 1, "chain"), timeout=30)
    assert time.monotonic() - t0 < 2.0
    assert not c.alive()
    with pytest.raises(DraftDied):
        c.ping()
    c.restart()
    new_pid = c.worker_pid
    assert new_pid != pid and c.alive()
    c.close()
    assert_clean(pid)
    assert_clean(new_pid)


def test_bad_gguf_raises_with_message(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(DraftError, match="bad.gguf"):
        DraftClient(DraftConfig(gguf_path=str(bad), n_ctx=256, load_timeout_s=60))
    assert my_segments() == []
    kids = [k for k in psutil.Process().children(recursive=True) if "resource_tracker" not in " ".join(k.cmdline())]
    assert all(gone(k.pid) for k in kids)


def test_sigkilled_target_leaves_no_orphan(draft_gguf):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from duo.runtime.draft_client import DraftClient, DraftConfig
        c = DraftClient(DraftConfig(gguf_path={draft_gguf!r}, n_ctx=256))
        c.start([1, 2, 3], overlap=True)
        print(c.worker_pid, c._chan.spec.name, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr
    pid, name = out.stdout.split()
    assert gone(int(pid), wait=5.0), "draft worker outlived its SIGKILLed parent"
    deadline = time.monotonic() + 5.0
    while os.path.exists(f"/dev/shm/{name}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/dev/shm/{name}")

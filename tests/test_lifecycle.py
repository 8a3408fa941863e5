"""Engine life cycle: nothing left behind (processes, /dev/shm) after close, an exception or a dead
worker; a worker killed or hung mid-generation means the target finishes alone, exactly, and says so;
the next generation speculates again."""
import gc
import os
import signal
import time

import psutil
import pytest

from duo import Engine


def shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm"))


def children() -> list[psutil.Process]:
    """Our child processes, except multiprocessing's resource tracker (it lives as long as we do)."""
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(c.cmdline()):
                out.append(c)
        except psutil.NoSuchProcess:
            pass
    return out


def assert_clean(shm_before: set[str]) -> None:
    gc.collect()
    deadline = time.monotonic() + 5
    while (children() or shm_entries() - shm_before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children() == [], f"child processes left: {children()}"
    assert shm_entries() - shm_before == set(), f"/dev/shm entries left: {shm_entries() - shm_before}"


@pytest.fixture
def make_engine(tiny_pair):
    def make(**kw):
        kw.setdefault("mode", "sequential")
        kw.setdefault("budget", 8)
        return Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", progress=False, **kw)
    return make


PROMPT = "def fibonacci(n):"


def test_close_leaves_nothing(make_engine):
    before = shm_entries()
    e = make_engine()
    assert len(children()) == 1 and any(n.startswith("duo_") for n in shm_entries() - before)
    e.generate(PROMPT, max_new_tokens=8)
    e.close()
    e.close()  # idempotent
    assert_clean(before)


def test_exception_inside_with_leaves_nothing(make_engine):
    before = shm_entries()
    with pytest.raises(RuntimeError, match="boom"):
        with make_engine() as e:
            e.generate(PROMPT, max_new_tokens=4)
            raise RuntimeError("boom")
    assert_clean(before)


def test_abandoned_stream_leaves_engine_usable(make_engine):
    with make_engine() as e:
        ref = e.generate(PROMPT, max_new_tokens=24).token_ids
        it = e.stream(PROMPT, max_new_tokens=24)
        next(it)
        del it  # a consumer that stops reading mid-way
        gc.collect()
        assert e.generate(PROMPT, max_new_tokens=24).token_ids == ref


@pytest.mark.parametrize("mode", ["sequential", "overlap"])
def test_worker_killed_mid_generation(make_engine, mode):
    before = shm_entries()
    with make_engine(mode=mode) as e, make_engine(mode="target") as alone:
        ref = alone.generate(PROMPT, max_new_tokens=40).token_ids
        from duo.runtime.decode import Stats
        stats = Stats()
        got = []
        for i, (new, _) in enumerate(e.stream_tokens(PROMPT, max_new_tokens=40, stats=stats)):
            got += new
            if i == 1:
                os.kill(e._draft.worker_pid, signal.SIGKILL)
        assert got == ref
        assert stats.fallback and "died" in stats.fallback.lower()
        # the next generation restarts the worker and speculates again
        res = e.generate(PROMPT, max_new_tokens=40)
        assert res.token_ids == ref and res.stats["fallback"] is None and res.stats["drafted"] > 0
    assert_clean(before)


def test_worker_hung_mid_generation(make_engine):
    before = shm_entries()
    with make_engine() as e, make_engine(mode="target") as alone:
        ref = alone.generate(PROMPT, max_new_tokens=30).token_ids
        from duo.runtime.decode import Stats
        stats = Stats()
        got = []
        t0 = time.monotonic()
        for i, (new, _) in enumerate(e.stream_tokens(PROMPT, max_new_tokens=30, stats=stats)):
            got += new
            if i == 1:
                os.kill(e._draft.worker_pid, signal.SIGSTOP)
        assert got == ref
        assert stats.fallback and "timeout" in stats.fallback.lower()
        assert time.monotonic() - t0 < 30
        res = e.generate(PROMPT, max_new_tokens=30)
        assert res.token_ids == ref and res.stats["fallback"] is None and res.stats["drafted"] > 0
    assert_clean(before)

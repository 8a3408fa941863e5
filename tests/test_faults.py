"""Fault injection: the draft worker SIGKILLed at random points, stopped (SIGSTOP), hanging, failing or
crashing inside llama.cpp, or answering with a corrupt channel message (wrong round id, out-of-range token,
bad parent index, bad length).

In every case: the generation completes with the target's own greedy output, the stats report the fallback,
the next generation on the same Engine speculates again (a new worker), and nothing is left behind (the old
worker is gone; /dev/shm holds only the live channel, and nothing of this pid once the engines close).
Faults inside the worker come from its test hook, DraftConfig.fault (duo.testing.faults.Fault).
`pytest -s` prints the fault matrix (fault x outcome) at the end of the module.

Also here: leaks after hard kills (a SIGKILLed process group leaves its segment, the next channel sweeps
it; no named semaphores at all) and the channel's rejection of a reply to another round.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from duo import Engine
from duo.plan import Plan
from duo.runtime import channel as ch
from duo.runtime.decode import Stats
from duo.plan import TreeSpec
from duo.sampling import SamplingParams
from duo.runtime.draft_client import DraftClient, DraftConfig, DraftError, DraftTimeout
from duo.testing.procs import gone

REPO = Path(__file__).resolve().parents[1]
PROMPT = "def fibonacci(n):"
N_NEW = 64
DRAFT_MS = 5.0          # the "profiled" draft speed these engines are given: hang timeout = max(2 s, 40 x 8 x 5 ms)
MATRIX: list[dict] = []


def my_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"duo_{os.getpid()}_")}


def sem_entries() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("sem.")}


def workers() -> list[int]:
    """Our child processes, except multiprocessing's resource tracker."""
    out = []
    for c in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" not in " ".join(c.cmdline()):
                out.append(c.pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module", autouse=True)
def print_matrix():
    yield
    if MATRIX:
        print("\n\nfault matrix (tiny pair, greedy, %d new tokens)" % N_NEW)
        print(f"{'fault':<22} {'mode':<10} {'exact':<6} {'detect_s':>8} {'recovered':<9} {'clean':<6} fallback")
        for r in MATRIX:
            print(f"{r['fault']:<22} {r['mode']:<10} {str(r['exact']):<6} {r['detect_s']:>8.2f} "
                  f"{str(r['recovered']):<9} {str(r['clean']):<6} {r['fallback'][:90]}")


@pytest.fixture(scope="module")
def engines(tiny_pair):
    """One speculative Engine per mode (reused: every case must leave it healthy) and the target alone.
    EOS is switched off so that every generation runs its full length."""
    shm0 = my_segments()
    made = {"target": Engine(str(tiny_pair.target_hf_dir), device="cpu", mode="target", progress=False)}
    for mode in ("sequential", "overlap"):
        # no output cache: every case repeats one prompt, whose earlier answer would draft it instead of the worker
        made[mode] = Engine(str(tiny_pair.target_hf_dir), str(tiny_pair.draft_gguf), device="cpu", progress=False,
                            plan=Plan(mode=mode, budget=8, draft_ms_per_token=DRAFT_MS, source="test"), output_cache=0)
    for e in made.values():
        e.target.eos_ids = frozenset()
    yield made
    for e in made.values():
        e.close()
    deadline = time.monotonic() + 5
    while (workers() or my_segments() - shm0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers() == [], "draft workers left behind"
    assert my_segments() - shm0 == set(), "shared memory left behind"


@pytest.fixture(scope="module")
def reference(engines):
    return engines["target"].generate(PROMPT, max_new_tokens=N_NEW).token_ids


def run_case(engines, reference, fault: str, mode: str, *, spec: str | None = None, on_round=None,
             expect: str = "") -> dict:
    """Generate under a fault; check exactness, the reported fallback, recovery and clean-up."""
    e = engines[mode]
    e.generate(PROMPT, max_new_tokens=2)      # a healthy worker to start from
    if spec is not None:
        e._draft.cfg.fault = spec
        e._draft.restart()
    old_pid = e._draft.worker_pid
    stats, got = Stats(), []
    try:
        for i, (new, _) in enumerate(e.stream_tokens(PROMPT, max_new_tokens=N_NEW, stats=stats)):
            got += new
            if on_round is not None:
                on_round(e, old_pid, i)
    finally:
        e._draft.cfg.fault = None
    row = dict(fault=fault, mode=mode, exact=got == reference, fallback=stats.fallback or "",
               detect_s=stats.target_idle_s)
    MATRIX.append(row)
    assert got == reference, f"{fault}: output differs from the target alone"
    assert stats.fallback, f"{fault}: no fallback reported"
    assert re.search(expect, stats.fallback, re.I), stats.fallback
    res = e.generate(PROMPT, max_new_tokens=N_NEW)  # restarts the worker, speculates again
    row["recovered"] = (res.token_ids == reference and res.stats["fallback"] is None and res.stats["drafted"] > 0
                        and e._draft.worker_pid != old_pid)
    assert row["recovered"], f"{fault}: no recovery: {res.stats}"
    live = [e2._draft for e2 in engines.values() if e2._draft is not None]
    row["clean"] = gone(old_pid) and set(workers()) == {d.worker_pid for d in live} and \
        my_segments() == {d._chan.spec.name for d in live}
    assert row["clean"], f"{fault}: left behind: workers {workers()}, segments {my_segments()}"
    return row


# ------------------------------------------------------------------------------------ SIGKILL
@pytest.mark.parametrize("seed", range(6))
def test_sigkill_at_random_points(engines, reference, seed):
    """SIGKILL from another thread at a random round and a random delay into it (mid-draft, mid-reply,
    during the overlap's draft-ahead...)."""
    rng = np.random.default_rng(seed)
    mode = ("sequential", "overlap")[seed % 2]
    at, delay = int(rng.integers(0, 4)), float(rng.uniform(0, 0.02))
    timers = []

    def on_round(e, pid, i):
        if i == at:
            t = threading.Timer(delay, os.kill, (pid, signal.SIGKILL))
            t.start()
            timers.append(t)

    try:
        run_case(engines, reference, f"SIGKILL r{at}+{delay * 1e3:.0f}ms", mode, on_round=on_round, expect="died")
    finally:
        for t in timers:
            t.cancel()
            t.join()


@pytest.mark.parametrize("n", [1, 4, 13])
def test_crash_inside_llama_decode(engines, reference, n):
    """The worker exits inside its n-th llama_decode (1: the prompt's prefill at START)."""
    mode = "overlap" if n == 4 else "sequential"
    run_case(engines, reference, f"exit_at_decode:{n}", mode, spec=f"exit_at_decode:{n}", expect="died")


# ------------------------------------------------------------------------------------ hangs
def test_hang_timeout_is_derived_from_draft_speed(engines):
    e = engines["sequential"]
    cfg = e._decode_config(16, SamplingParams(), 10, {})
    assert cfg.draft_timeout_s == max(2.0, 20 * 2 * e.plan.budget * DRAFT_MS / 1000) == 2.0
    saved = e.plan.draft_ms_per_token
    try:
        e.plan.draft_ms_per_token = 40.0   # a 8x slower draft waits 8x longer before calling it hung
        assert e._decode_config(16, SamplingParams(), 10, {}).draft_timeout_s == pytest.approx(20 * 2 * 8 * 0.040)
    finally:
        e.plan.draft_ms_per_token = saved


@pytest.mark.parametrize("mode", ["sequential", "overlap"])
def test_sigstop(engines, reference, mode):
    timeout = engines[mode]._decode_config(16, SamplingParams(), 10, {}).draft_timeout_s

    def on_round(e, pid, i):
        if i == 1:
            os.kill(pid, signal.SIGSTOP)

    t0 = time.monotonic()
    row = run_case(engines, reference, "SIGSTOP", mode, on_round=on_round, expect="timeout")
    # detected by the timeout (one more period if the worker had just decoded), not by a fixed long sleep
    assert timeout * 0.9 <= row["detect_s"] <= 2 * timeout + 1.5, row
    assert time.monotonic() - t0 < 2 * timeout + 20


def test_slow_is_not_hung(tiny_pair):
    """A long prompt's prefill on a slow draft takes longer than the timeout in all, but every llama_decode
    (one per 512-token batch) moves the heartbeat well within it: no timeout. A hang is still caught."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 500, 2600).tolist()   # 6 batches
    cfg = DraftConfig(gguf_path=str(tiny_pair.draft_gguf), n_ctx=4096, max_nodes=16, load_timeout_s=60,
                      fault="slow_decode:250")
    with DraftClient(cfg) as c:
        c.start(prompt, overlap=False)
        t0 = time.monotonic()
        tree = c.request_tree([], TreeSpec(4, 1, "chain"), timeout=1.0)   # ~6 x 0.25 s prefill + 4 x 0.25 s
        assert len(tree) == 4 and time.monotonic() - t0 > 1.5
    cfg.fault = "hang_at_decode:3"
    with DraftClient(cfg) as c:
        c.start(prompt, overlap=False)
        t0 = time.monotonic()
        with pytest.raises(DraftTimeout):
            c.request_tree([], TreeSpec(4, 1, "chain"), timeout=1.0)
        assert time.monotonic() - t0 < 2 * 1.0 + 1.0   # at most one more period after the last heartbeat


@pytest.mark.parametrize("mode,n", [("sequential", 6), ("overlap", 9)])
def test_hang_inside_llama_decode(engines, reference, mode, n):
    """The n-th llama_decode never returns; the process is alive (not stopped) and must be killed."""
    timeout = engines[mode]._decode_config(16, SamplingParams(), 10, {}).draft_timeout_s
    row = run_case(engines, reference, f"hang_at_decode:{n}", mode, spec=f"hang_at_decode:{n}", expect="timeout")
    assert timeout * 0.9 <= row["detect_s"] <= 2 * timeout + 1.5, row


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("mode,n", [("sequential", 1), ("sequential", 7), ("overlap", 1), ("overlap", 11)])
def test_exception_inside_llama_decode(engines, reference, mode, n):
    """From the n-th llama_decode on every call raises (1: the START prefill fails)."""
    run_case(engines, reference, f"raise_at_decode:{n}", mode, spec=f"raise_at_decode:{n}", expect="injected fault")


# ------------------------------------------------------------------------------------ corrupt replies
@pytest.mark.parametrize("spec,mode,expect", [
    ("bad_round:1", "sequential", "corrupt reply.*expected round"),
    ("bad_round:3", "overlap", "corrupt reply.*expected round"),
    ("bad_token:2", "sequential", "token id out of range"),
    ("bad_token:1", "overlap", "token id out of range"),
    ("bad_parent:2", "sequential", "parent index out of range"),
    ("bad_parent:4", "overlap", "parent index out of range"),
    ("bad_length:2", "sequential", "corrupt tree length"),
])
def test_corrupt_reply(engines, reference, spec, mode, expect):
    row = run_case(engines, reference, spec, mode, spec=spec, expect=expect)
    assert row["detect_s"] < 1.0, "a corrupt reply is rejected at once, not after a timeout"


def test_wrong_round_is_rejected_by_the_client(tiny_pair):
    """The channel rejects a reply to another round at once (before: the client ignored it and timed out)."""
    cfg = DraftConfig(gguf_path=str(tiny_pair.draft_gguf), n_ctx=256, max_nodes=16, load_timeout_s=60,
                      fault="bad_round:1")
    with DraftClient(cfg) as c:
        c.start([5, 6, 7, 8], overlap=False)
        t0 = time.monotonic()
        with pytest.raises(DraftError, match="corrupt reply.*round 1002.*expected round 2"):
            c.request_tree([], TreeSpec(4, 1, "chain"), timeout=30)
        assert time.monotonic() - t0 < 5
        assert c.alive()
        assert len(c.request_tree([9], TreeSpec(4, 1, "chain"), timeout=30)) == 4  # one-shot: the next reply is fine


def test_fault_hook_is_off_by_default_and_checked(tiny_pair):
    assert DraftConfig(gguf_path="x").fault is None
    with pytest.raises(DraftError, match="fault must be"):
        DraftClient(DraftConfig(gguf_path=str(tiny_pair.draft_gguf), n_ctx=64, load_timeout_s=60, fault="nope:1"))


# ------------------------------------------------------------------------------------ hard kills: leaks
KILLED = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from duo.runtime.draft_client import DraftClient, DraftConfig
    c = DraftClient(DraftConfig(gguf_path=sys.argv[1], n_ctx=256))
    c.start([1, 2, 3], overlap=True)
    print(c._chan.spec.name, flush=True)
    time.sleep(120)
""")


def test_sigkilled_process_group_leaves_a_segment_that_the_next_channel_sweeps(tiny_pair):
    """SIGKILL of a whole process group (target, worker and the resource tracker): its segment stays in
    /dev/shm until the next channel's creation sweeps it; no semaphore is left (eventfds have no name)."""
    sems0 = sem_entries()
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(tiny_pair.draft_gguf), str(REPO)],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        name = p.stdout.readline().strip()
        assert re.fullmatch(rf"duo_{p.pid}_[0-9a-f]{{12}}", name), name
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()
    time.sleep(0.5)
    assert os.path.exists(f"/dev/shm/{name}"), "the resource tracker died too: the segment must be there"
    assert sem_entries() - sems0 == set(), "named semaphores leaked"
    chan = ch.Channel.create(16, 1)   # sweeps
    try:
        assert not os.path.exists(f"/dev/shm/{name}")
        assert os.path.exists(f"/dev/shm/{chan.spec.name}")
    finally:
        chan.close()


def test_sweep_removes_only_dead_unlocked_duo_segments():
    import fcntl

    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not psutil.pid_exists(dead.pid)
    live = ch.Channel.create(16, 1)
    names = {
        "stale": f"duo_{dead.pid}_0123456789ab",
        "locked": f"duo_{dead.pid}_ba9876543210",
        "other_prefix": f"duox_{dead.pid}_0123456789ab",
        "other_pattern": f"duo_{dead.pid}_notours",
    }
    lock_fd = None
    try:
        for n in names.values():
            Path(f"/dev/shm/{n}").write_bytes(b"\0" * 64)
        lock_fd = os.open(f"/dev/shm/{names['locked']}", os.O_RDONLY)
        fcntl.flock(lock_fd, fcntl.LOCK_SH)   # a live owner in another pid namespace
        removed = ch.sweep_stale_segments()
        assert names["stale"] in removed
        left = set(os.listdir("/dev/shm"))
        assert names["stale"] not in left
        assert {names["locked"], names["other_prefix"], names["other_pattern"], live.spec.name} <= left
        os.close(lock_fd)
        lock_fd = None
        assert names["locked"] in ch.sweep_stale_segments()
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
        for n in names.values():
            Path(f"/dev/shm/{n}").unlink(missing_ok=True)
        live.close()
    assert not os.path.exists(f"/dev/shm/{live.spec.name}")


def test_channel_uses_no_named_semaphores():
    sems0 = sem_entries()
    chan = ch.Channel.create(16, 1)
    try:
        assert isinstance(chan.req, ch.EventSemaphore) and isinstance(chan.resp, ch.EventSemaphore)
        assert sem_entries() == sems0
        assert not chan.req.acquire(block=False)
        chan.req.release()
        chan.req.release()
        assert chan.req.acquire(timeout=0) and chan.req.acquire(block=False) and not chan.req.acquire(timeout=0.01)
        t0 = time.monotonic()
        threading.Timer(0.05, chan.resp.release).start()
        assert chan.resp.acquire(timeout=5) and time.monotonic() - t0 < 2
    finally:
        chan.close()

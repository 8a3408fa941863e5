"""Ready for the GPU (issue 20, part): llama.cpp's processes see no GPU, the default plan on a GPU target, the
profiler's timings on a CUDA device, and the profile key naming the GPU actually used. All on the CPU: CUDA calls
are monkeypatched where the code would make them, no kernel runs."""
from __future__ import annotations

import os
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch

from duo.plan import default_plan
from duo.profiler import gpu_identity as G
from duo.profiler.inventory import GPU, Inventory
from duo.runtime import llama_probe

HIDDEN = tuple(llama_probe.HIDDEN_GPUS)


def environ_of(pid: int) -> dict:
    """A process's environment as it started (what /proc shows: the block exec gave it)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [e.split(b"=", 1) for e in f.read().split(b"\0") if b"=" in e]
    return {k.decode(): v.decode() for k, v in pairs}


@pytest.fixture
def parent_gpu_env(monkeypatch):
    """The parent sees GPU 0 (CUDA) and 1 (ROCm); ROCR and Vulkan unset."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "1")
    monkeypatch.delenv("ROCR_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("GGML_VK_VISIBLE_DEVICES", raising=False)


def assert_parent_env_kept():
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0" and os.environ["HIP_VISIBLE_DEVICES"] == "1"
    assert "ROCR_VISIBLE_DEVICES" not in os.environ and "GGML_VK_VISIBLE_DEVICES" not in os.environ


# ------------------------------------------------------------------------------------------- 4: no GPU for llama.cpp
def test_gpus_hidden_sets_and_restores_even_on_error(parent_gpu_env):
    with pytest.raises(RuntimeError), llama_probe.gpus_hidden():
        assert all(os.environ[k] == "" for k in HIDDEN)
        raise RuntimeError("start failed")
    assert_parent_env_kept()


def test_the_probe_child_gets_a_gpu_free_environment(parent_gpu_env, monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kw):
        seen.update(kw["env"])
        return subprocess.CompletedProcess(cmd, 0, '{"ok": true}\n', "")

    monkeypatch.setattr(llama_probe.subprocess, "run", fake_run)
    rc, answer, _ = llama_probe.run_child(tmp_path / "d.gguf", "plain", 1)
    assert rc == 0 and answer == {"ok": True}
    assert all(seen[k] == "" for k in HIDDEN), {k: seen.get(k) for k in HIDDEN}
    assert_parent_env_kept()


def test_the_draft_worker_sees_no_gpu(tiny_pair, parent_gpu_env):
    pytest.importorskip("llama_cpp")
    from duo.runtime.draft_client import DraftClient, DraftConfig

    with DraftClient(DraftConfig(gguf_path=str(tiny_pair.draft_gguf), n_threads=1, n_ctx=256, max_seqs=2,
                                 extra_bufts=False, load_timeout_s=60)) as c:
        env = environ_of(c.worker_pid)
        assert c.ping() > 0
    assert {k: env.get(k) for k in HIDDEN} == dict.fromkeys(HIDDEN, "")
    assert_parent_env_kept()


def test_the_profilers_draft_bencher_sees_no_gpu(tiny_pair, parent_gpu_env):
    pytest.importorskip("llama_cpp")
    from duo.profiler.benchers import DraftBencher

    with DraftBencher(str(tiny_pair.draft_gguf), 1, None, n_ctx=256, max_seqs=1, timeout=120) as db:
        env = environ_of(db.proc.pid)
    assert {k: env.get(k) for k in HIDDEN} == dict.fromkeys(HIDDEN, "")
    assert_parent_env_kept()


# ------------------------------------------------------------------------------------------- 6: the default plan
@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))


@pytest.mark.parametrize("mode,device", [("auto", "cuda"), ("auto", "cuda:1"), ("overlap", "cuda:0")])
def test_a_gpu_target_overlaps_on_one_host_core(eight_cores, mode, device):
    p = default_plan(mode, None, device)
    assert p.mode == "overlap" and p.target_threads == 1 and p.target_cores == [0]
    assert p.draft_cores == list(range(1, 8)) and p.draft_threads == 7 and p.draft_has_own_cores


def test_auto_device_follows_torch(eight_cores, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_plan("auto", None, "auto").mode == "overlap"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_plan("auto", None, "auto").mode == "sequential"


def test_a_gpu_target_on_one_core_shares_it(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    p = default_plan("auto", 8, "cuda")
    assert (p.mode, p.budget, p.target_cores, p.draft_cores, p.draft_threads) == ("overlap", 8, [3], [3], 1)


def test_the_cpu_keeps_its_defaults(eight_cores):
    p = default_plan("auto", None, "cpu")
    assert p.mode == "sequential" and p.draft_threads == p.target_threads == 8 and p.target_cores is None
    p = default_plan("overlap", None)
    assert (p.draft_cores, p.target_cores, p.draft_threads, p.target_threads) == ([6, 7], list(range(6)), 2, 6)
    assert default_plan("sequential", None, "cuda").mode == "sequential"   # asked for: kept on a GPU too
    assert default_plan("target", None, "cuda").target_threads == 8


def test_the_engine_gives_default_plan_its_device(tiny_pair, monkeypatch):
    from duo import engine as E

    seen = []
    real = E.default_plan
    monkeypatch.setattr(E, "default_plan", lambda mode, budget, device=None: (seen.append(device),
                                                                              real(mode, budget, "cpu"))[1])
    with E.Engine(str(tiny_pair.target_hf_dir), device="cpu", mode="target", profile="off", progress=False):
        pass
    assert seen == ["cpu"]


# ------------------------------------------------------------------------------------------- 7: timings on CUDA
class StubTarget:
    """The Target calls TargetBencher makes, on plain lists and CPU tensors, claiming to live on `device`."""

    def __init__(self, device, max_context=4096):
        self.device, self.max_context, self.calls = device, max_context, []

    def new_cache(self):
        return []

    def prefill(self, cache, tokens):
        self.calls.append("prefill")
        cache.extend(tokens)

    def cache_length(self, cache):
        return len(cache)

    def forward_tree(self, cache, root, tree):
        self.calls.append("forward")
        cache.extend([root] + [int(t) for t in tree.tokens])
        return torch.zeros(1 + len(tree), 11)

    def compact_cache(self, cache, n_keep, path):
        kept = cache[:n_keep] + [cache[n_keep + p] for p in path]
        cache[:] = kept


@pytest.fixture
def synced(monkeypatch):
    """torch.cuda.synchronize's arguments, and where in the stub's calls each came."""
    calls = []
    stub = StubTarget(torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append((device, len(stub.calls))))
    return stub, calls


def test_a_timed_pass_synchronizes_the_targets_device(synced):
    from duo.profiler.benchers import TargetBencher

    stub, calls = synced
    tb = TargetBencher(stub, list(range(1, 80)))
    tb.cache(16)
    assert calls == [(torch.device("cuda", 1), 1)]   # the prefill finished before anything is timed
    ms = tb.once(16, tb.tree(16, 4))
    assert ms >= 0 and stub.calls == ["prefill", "forward"]
    assert calls[1:] == [(torch.device("cuda", 1), 1), (torch.device("cuda", 1), 2)]   # before and after the pass
    assert len(tb.cache(16)) == 16


def test_the_cpu_never_synchronizes(monkeypatch):
    from duo.profiler.benchers import TargetBencher

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: pytest.fail("synchronize on the CPU"))
    tb = TargetBencher(StubTarget(torch.device("cpu")), list(range(1, 80)))
    assert tb.once(16, tb.tree(16, 4)) >= 0


class SpinningDraft:
    """The DraftBencher calls interference makes: one decode step recorded while spinning."""

    def spin(self, tokens):
        self.t0 = time.monotonic()

    def stop_spin(self):
        return [(self.t0 + 1e-4, 2.0)]


@pytest.mark.parametrize("gpu", [True, False])
def test_interference_pins_the_target_as_the_overlap_runs_it(synced, monkeypatch, gpu):
    from duo.profiler.benchers import TargetBencher, interference
    from duo.profiler.timing import Settings

    stub, _ = synced
    pins = []
    monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pins.append((pid, sorted(cores))))
    saved = sorted(os.sched_getaffinity(0))
    t = 1 if gpu else 3
    tb = TargetBencher(stub, list(range(1, 80)))
    s = Settings(contexts=(16,), min_reps=1, max_reps=1)
    threads = torch.get_num_threads()
    row = interference(tb, SpinningDraft(), 1, 4, [0, 1, 2, 3], gpu, 1, {(16, t, 1): 1.0, (16, t, 16): 1.0},
                       2.0, list(range(64)), s)
    assert pins == [(0, [0, 1, 2]), (0, saved)]   # the target off the draft's core 3, then as it was
    assert row["target_threads"] == t and torch.get_num_threads() == threads


def test_contexts_reach_8192_on_a_gpu_only():
    from duo.profiler.bench import measured_contexts
    from duo.profiler.timing import Settings

    quick, full = Settings(), Settings.for_mode(False)
    assert measured_contexts(quick, torch.device("cpu"), 32768) == quick.contexts == (128, 512)
    assert measured_contexts(full, "cpu", None) == full.contexts
    assert measured_contexts(quick, torch.device("cuda", 1), 32768) == (128, 512, 2048, 8192)
    assert measured_contexts(full, "cuda", None) == (128, 1024, 2048, 8192)
    assert measured_contexts(quick, "cuda:0", 4096) == (128, 512, 2048)   # a pass of 64 must fit
    assert measured_contexts(quick, "cuda", 8192) == (128, 512, 2048)
    assert measured_contexts(quick, "cuda", 256) == (128,)


# ------------------------------------------------------------------------------------------- 9: which GPU
G0 = GPU(0, "NVIDIA A100-SXM4-40GB", 40960, uuid="GPU-aaaa1111-0000-0000-0000-000000000000", pci="0000:3b:00")
MIG = GPU(0, "NVIDIA A100-SXM4-40GB MIG 1g.5gb", 4864, uuid="MIG-cccc3333-0000-0000-0000-000000000000",
          pci="0000:3b:00", mig_of=0)
G1 = GPU(1, "NVIDIA H100 80GB HBM3", 81559, uuid="GPU-bbbb2222-0000-0000-0000-000000000000", pci="0000:86:00")
NVML = [G0, MIG, G1]


@pytest.mark.parametrize("env,want", [
    (None, [G0, G1]), ("1", [G1]), ("1,0", [G1, G0]), (" 0 , 1", [G0, G1]),
    ("GPU-bbbb", [G1]), ("gpu-BBBB2222", [G1]), ("MIG-cccc", [MIG]), ("GPU-bbbb,MIG-cccc3333", [G1, MIG]),
    ("", []), ("-1", []), ("0,7,1", [G0]), ("0,0", [G0]), ("GPU-", []), ("GPU-zzzz,0", []), ("MIG-aaaa", []),
    ("first", []),
])
def test_cuda_visible_devices_maps_to_nvml(env, want):
    assert G.visible_gpus(env, NVML) == want


def test_the_used_gpu_by_uuid_then_pci_then_the_variable():
    assert G.match_gpu(0, NVML, uuid="BBBB2222-0000-0000-0000-000000000000") is G1   # cuda:0 is NVML's 1
    assert G.match_gpu(0, NVML, uuid="cccc3333-0000-0000-0000-000000000000") is MIG
    assert G.match_gpu(0, NVML, pci="0000:86:00") is G1
    assert G.match_gpu(1, NVML, uuid="dddd", env="1,0") is G0    # an unknown UUID: the variable decides
    assert G.match_gpu(0, NVML, env="GPU-bbbb") is G1
    assert G.match_gpu(2, NVML) is None and G.match_gpu(0, []) is None


def props(uuid="bbbb2222-0000-0000-0000-000000000000", bus=0x86, **kw):
    d = dict(name="NVIDIA H100 80GB HBM3", uuid=uuid, total_memory=85520809984, major=9, minor=0,
             pci_domain_id=0, pci_bus_id=bus, pci_device_id=0)
    d.update(kw)
    return SimpleNamespace(**d)


def test_target_gpu_reads_torchs_uuid(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")    # wrong on purpose: torch's UUID wins
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props())
    assert G.target_gpu(0, NVML) == {"name": G1.name, "uuid": G1.uuid, "memory_mib": 81559}
    # no NVML: torch's own facts
    assert G.target_gpu(0, []) == {"name": G1.name, "uuid": "GPU-bbbb2222-0000-0000-0000-000000000000",
                                   "memory_mib": 85520809984 >> 20}
    # an older torch without UUID or PCI fields: CUDA_VISIBLE_DEVICES applied to NVML's list
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        name="x", total_memory=1 << 30))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert G.target_gpu(0, NVML)["uuid"] == G1.uuid


def test_the_inventory_records_the_gpu_of_the_device(monkeypatch):
    from duo.profiler import inventory
    from duo.runtime import target

    monkeypatch.setattr(inventory, "nvidia_gpus", lambda: (list(NVML), ""))
    monkeypatch.setattr(target, "resolve_device", lambda d: torch.device(d))
    monkeypatch.setattr(target, "resolve_dtype", lambda d, dev: SimpleNamespace(name="bfloat16"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: props(uuid=[G1.uuid, G0.uuid][i][4:], bus=[0x86, 0x3b][i]))
    inv = inventory.collect("cuda:1", "bfloat16")
    assert inv.device == "cuda:1" and inv.target_gpus == [G.identity(G0)]
    assert "MIG" not in inv.describe()
    assert Inventory.from_dict(inv.to_dict()) == inv


def test_profile_keys_differ_by_the_gpu_used():
    from duo.profiler import profile as P

    base = dict(cpu_model="Test CPU 9000", arch="x86_64", physical_cores=4, logical_cores=8, usable_cores=[0, 1],
                ram_total_gib=31.6, gpus=list(NVML), device="cuda:0", dtype="bfloat16")
    t, d = {"name": "t", "size": 10}, {"name": "d", "size": 5}
    keys = [P.profile_key(Inventory(**base, target_gpus=[G.identity(g)]), t, d) for g in (G0, G1, MIG)]
    assert len({P.fingerprint(k) for k in keys}) == 3
    assert keys[1]["target_gpus"] == [{"name": G1.name, "uuid": G1.uuid, "memory_mib": 81559}]
    assert keys[0]["gpus"] == [G0.name, G1.name]   # the machine's GPUs, MIG instances aside
    changes = P.diff(keys[0], keys[1])
    assert any(c.startswith("target_gpus: ") and "bbbb2222" in c for c in changes), changes
    # a CPU target's key is as it was (no GPU entry): saved CPU profiles keep their fingerprints
    cpu = P.profile_key(Inventory(**dict(base, gpus=[], device="cpu", dtype="float32")), t, d)
    assert "target_gpus" not in cpu


def test_nvml_lists_uuids_pci_addresses_and_mig_instances(monkeypatch):
    import sys

    from duo.profiler import inventory

    class NotSupported(Exception):
        pass

    def unsupported(*a):
        raise NotSupported()

    boards = {0: ("NVIDIA A100-SXM4-40GB", G0.uuid, 0x3b, 1), 1: ("NVIDIA H100 80GB HBM3", G1.uuid, 0x86, 0)}
    mig = ("mig", 0, 0)
    fake = SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlSystemGetDriverVersion=lambda: b"550.54",
        nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: MIG.name if h == mig else boards[h][0],
        nvmlDeviceGetUUID=lambda h: MIG.uuid if h == mig else boards[h][1],
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=(4864 if h == mig else [40960, 81559][h]) << 20, used=0),
        nvmlDeviceGetUtilizationRates=unsupported, nvmlDeviceGetCudaComputeCapability=lambda h: (8, 0),
        nvmlDeviceGetPciInfo=lambda h: SimpleNamespace(domain=0, bus=boards[h][2], device=0),
        nvmlDeviceGetMigMode=lambda h: (boards[h][3], boards[h][3]),
        nvmlDeviceGetMaxMigDeviceCount=lambda h: 2,
        nvmlDeviceGetMigDeviceHandleByIndex=lambda h, j: mig if j == 0 else unsupported())  # slot 1 empty
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus, note = inventory.nvidia_gpus()
    assert note == "" and [(g.uuid, g.pci, g.mig_of) for g in gpus] == [
        (G0.uuid, "0000:3b:00", None), (MIG.uuid, "0000:3b:00", 0), (G1.uuid, "0000:86:00", None)]
    assert gpus[1].memory_total_mib == 4864 and gpus[2].driver == "550.54"
    assert G.visible_gpus("1", gpus)[0].uuid == G1.uuid and G.visible_gpus("MIG-cccc", gpus) == [gpus[1]]

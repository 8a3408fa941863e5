"""What this machine has: CPU, cores, frequency, memory, NVIDIA GPUs (NVML), and the torch device/dtype duo uses,
with the GPU the target runs on (duo.profiler.gpu_identity)."""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field


@dataclass
class GPU:
    index: int
    name: str
    memory_total_mib: int = 0
    memory_used_mib: int = 0
    utilization_pct: int | None = None
    driver: str = ""
    cuda_capability: str = ""
    uuid: str = ""                 # NVML's "GPU-..." ("MIG-..." for a MIG instance)
    pci: str = ""                  # PCI domain:bus:device, "0000:3b:00"
    mig_of: int | None = None      # a MIG instance of GPU `index` (not a GPU of its own)


@dataclass
class Inventory:
    cpu_model: str
    arch: str
    physical_cores: int
    logical_cores: int
    usable_cores: list[int]                 # this process's CPU affinity
    freq_mhz: float | None = None           # current
    freq_max_mhz: float | None = None
    ram_total_gib: float = 0.0
    ram_available_gib: float = 0.0
    load_avg_1m: float | None = None        # > usable cores: others compete, timings are noisy
    gpus: list[GPU] = field(default_factory=list)
    gpu_note: str = ""                       # why no GPU is listed (no driver, NVML error)
    device: str = "cpu"                      # torch device the target uses
    target_gpus: list[dict] = field(default_factory=list)   # the GPU(s) it runs on: {"name", "uuid", "memory_mib"}
    dtype: str = "float32"
    torch: str = ""
    torch_cuda: str | None = None
    llama_cpp: str = ""
    transformers: str = ""
    python: str = ""
    os: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Inventory":
        d = dict(d)
        d["gpus"] = [GPU(**g) for g in d.get("gpus", [])]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def describe(self) -> str:
        cores = f"{len(self.usable_cores)} usable of {self.logical_cores} logical / {self.physical_cores} physical cores"
        freq = f", {self.freq_max_mhz or self.freq_mhz:.0f} MHz" if (self.freq_max_mhz or self.freq_mhz) else ""
        gpus = "; ".join(f"{g.name} ({g.memory_total_mib / 1024:.0f} GiB" + (f", {g.utilization_pct}% busy"
                                                                               if g.utilization_pct else "")
                         + (f", driver {g.driver})" if g.driver else ")") for g in self.gpus if g.mig_of is None) \
            or f"no GPU ({self.gpu_note})"
        return f"{self.cpu_model} ({self.arch}), {cores}{freq}, {self.ram_total_gib:.0f} GiB RAM; {gpus}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def nvidia_gpus() -> tuple[list[GPU], str]:
    """GPUs through NVML (nvidia-ml-py), in its (PCI) order, each followed by its MIG instances; ([], reason)
    without an NVIDIA driver."""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py not installed"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return [], f"no NVIDIA driver ({type(e).__name__})"
    gpus: list[GPU] = []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            util = _optional(lambda: int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu), None)  # not on MIG, some boards
            cap = _optional(lambda: ".".join(map(str, pynvml.nvmlDeviceGetCudaComputeCapability(h))), "")
            pci = _optional(lambda: _pci(pynvml.nvmlDeviceGetPciInfo(h)), "")
            gpus.append(GPU(i, _text(pynvml.nvmlDeviceGetName(h)), int(mem.total) >> 20, int(mem.used) >> 20, util,
                            driver, cap, _optional(lambda: _text(pynvml.nvmlDeviceGetUUID(h)), ""), pci))
            gpus += _optional(lambda: _mig_instances(pynvml, h, gpus[-1]), [])
    except Exception as e:  # noqa: BLE001
        return gpus, f"NVML error: {e}"
    finally:
        _optional(pynvml.nvmlShutdown, None)
    return gpus, "" if gpus else "NVML found no GPU"


def _mig_instances(pynvml, h, gpu: GPU) -> list[GPU]:
    """The MIG instances of a GPU in MIG mode ([] otherwise): what a "MIG-..." CUDA_VISIBLE_DEVICES names."""
    if not _optional(lambda: pynvml.nvmlDeviceGetMigMode(h)[0], 0):
        return []
    out = []
    for j in range(_optional(lambda: pynvml.nvmlDeviceGetMaxMigDeviceCount(h), 0)):
        m = _optional(lambda: pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, j), None)   # NotFound: an empty slot
        if m is not None:
            mem = pynvml.nvmlDeviceGetMemoryInfo(m)
            out.append(GPU(gpu.index, _text(pynvml.nvmlDeviceGetName(m)), int(mem.total) >> 20, int(mem.used) >> 20,
                           None, gpu.driver, gpu.cuda_capability, _text(pynvml.nvmlDeviceGetUUID(m)), gpu.pci,
                           mig_of=gpu.index))
    return out


def _optional(fn, default):
    """fn(), or `default` where NVML does not support it here (NVMLError_NotSupported, ...)."""
    try:
        return fn()
    except Exception:  # noqa: BLE001
        return default


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _pci(info) -> str:
    from .gpu_identity import pci_address
    return pci_address(info.domain, info.bus, info.device)


def _version(module: str) -> str:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001
        return ""


def collect(device: str = "auto", dtype: str = "auto") -> Inventory:
    """The inventory; device/dtype are resolved as load_target would (a TargetError if impossible)."""
    import psutil
    import torch

    from ..runtime.target import resolve_device, resolve_dtype
    from . import gpu_identity

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    freq = None
    try:
        freq = psutil.cpu_freq()
    except Exception:  # noqa: BLE001 - not available in some containers
        pass
    vm = psutil.virtual_memory()
    gpus, note = nvidia_gpus()
    if not gpus and torch.cuda.is_available():  # a GPU torch sees but NVML does not
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            name, uuid, mib, pci = gpu_identity.torch_gpu_facts(i)
            gpus.append(GPU(i, name, mib, cuda_capability=f"{p.major}.{p.minor}", uuid=uuid, pci=pci))
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    dev_name = str(dev) if dev.type == "cpu" or dev.index is not None else f"cuda:{torch.cuda.current_device()}"
    used = [gpu_identity.target_gpu(torch.device(dev_name).index, gpus)] if dev.type == "cuda" else []
    return Inventory(
        cpu_model=cpu_model(), arch=platform.machine(),
        physical_cores=psutil.cpu_count(logical=False) or os.cpu_count() or 1,
        logical_cores=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        usable_cores=usable_cores(),
        freq_mhz=round(freq.current, 1) if freq and freq.current else None,
        freq_max_mhz=round(freq.max, 1) if freq and freq.max else None,
        ram_total_gib=round(vm.total / 2**30, 2), ram_available_gib=round(vm.available / 2**30, 2),
        load_avg_1m=round(load, 2) if load is not None else None,
        gpus=gpus, gpu_note=note, device=dev_name, target_gpus=used, dtype=dt.name,
        torch=torch.__version__, torch_cuda=torch.version.cuda, llama_cpp=_version("llama_cpp_python"),
        transformers=_version("transformers"), python=platform.python_version(),
        os=f"{platform.system()} {platform.release()}")

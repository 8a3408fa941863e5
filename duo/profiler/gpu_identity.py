"""Which GPU the target runs on, as a profile's key records it: {"name", "uuid", "memory_mib"}.

torch's cuda:N counts the GPUs CUDA makes visible: those CUDA_VISIBLE_DEVICES names, in its order (indices,
or UUIDs "GPU-..." / "MIG-..." and unique prefixes of them; the first invalid entry ends the list). NVML numbers
every GPU of the machine in PCI order and ignores the variable, so NVML's GPU N need not be cuda:N. The
target's GPU is found among NVML's (duo.profiler.inventory.GPU: whole GPUs and their MIG instances)

    1. by the UUID torch reports for cuda:N (torch.cuda.get_device_properties(N).uuid), else
    2. by its PCI address (the properties' pci_domain_id, pci_bus_id, pci_device_id), else
    3. by CUDA_VISIBLE_DEVICES applied to NVML's list (`visible_gpus`; its indices read in PCI order, as NVML's
       and as CUDA's with CUDA_DEVICE_ORDER=PCI_BUS_ID),

and from torch's own properties where NVML knows none of them.
"""
from __future__ import annotations

import os


def bare_uuid(uuid) -> str:
    """A UUID without its "GPU-" / "MIG-" prefix, lower case: NVML's and torch's spellings compare equal."""
    u = str(uuid or "").strip().lower()
    return u[4:] if u.startswith(("gpu-", "mig-")) else u


def pci_address(domain: int, bus: int, device: int) -> str:
    """"0000:3b:00": a GPU's PCI domain, bus and device, as NVML and torch both give them."""
    return f"{int(domain):04x}:{int(bus):02x}:{int(device):02x}"


def identity(gpu) -> dict:
    """What the profile key records of a GPU."""
    return {"name": gpu.name, "uuid": gpu.uuid, "memory_mib": int(gpu.memory_total_mib)}


def visible_gpus(env: str | None, gpus: list) -> list:
    """The GPUs CUDA makes visible, in cuda:N order, when CUDA_VISIBLE_DEVICES is `env` (None: unset, every whole
    GPU). An entry is an index among the whole GPUs or a UUID prefix matching exactly one GPU or MIG instance;
    CUDA ignores everything from the first entry that is neither (or repeats one): "" and "-1" hide them all."""
    whole = [g for g in gpus if g.mig_of is None]
    if env is None:
        return whole
    out: list = []
    for entry in (e.strip() for e in env.split(",")):
        if entry.isdigit():
            g = whole[int(entry)] if int(entry) < len(whole) else None
        elif entry.lower().startswith(("gpu-", "mig-")):
            kind, prefix = entry[:4].lower(), bare_uuid(entry)
            found = [g for g in gpus if g.uuid.lower().startswith(kind) and bare_uuid(g.uuid).startswith(prefix)]
            g = found[0] if len(found) == 1 else None
        else:
            g = None
        if g is None or g in out:
            break
        out.append(g)
    return out


def match_gpu(index: int, gpus: list, uuid: str = "", pci: str = "", env: str | None = None):
    """The NVML GPU that is cuda:`index`: by torch's `uuid` for it, else its `pci` address, else `env`
    (CUDA_VISIBLE_DEVICES) applied to `gpus`; None where none fits."""
    if bare_uuid(uuid):
        found = [g for g in gpus if bare_uuid(g.uuid) == bare_uuid(uuid)]
        if found:
            return found[0]
    if pci:
        found = [g for g in gpus if g.mig_of is None and g.pci == pci]
        if len(found) == 1:
            return found[0]
    visible = visible_gpus(env, gpus)
    return visible[index] if 0 <= index < len(visible) else None


def torch_gpu_facts(index: int) -> tuple[str, str, int, str]:
    """(name, UUID "GPU-...", total MiB, PCI address) of cuda:`index` as torch sees it ("" where it does not say)."""
    import torch

    p = torch.cuda.get_device_properties(index)
    uuid = bare_uuid(getattr(p, "uuid", ""))
    try:
        pci = pci_address(p.pci_domain_id, p.pci_bus_id, p.pci_device_id)
    except (AttributeError, TypeError, ValueError):   # older torch: no PCI fields
        pci = ""
    return p.name, f"GPU-{uuid}" if uuid else "", int(p.total_memory) >> 20, pci


def target_gpu(index: int, gpus: list) -> dict:
    """{"name", "uuid", "memory_mib"} of the GPU torch calls cuda:`index` (`gpus`: NVML's, possibly none)."""
    name, uuid, mib, pci = torch_gpu_facts(index)
    g = match_gpu(index, gpus, uuid, pci, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return identity(g) if g is not None else {"name": name, "uuid": uuid, "memory_mib": mib}

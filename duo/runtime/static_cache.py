"""The static KV cache of the compiled verify pass (static_target.py): preallocated, fixed addresses.

One tensor holds every layer's keys and values, the slab [2 * layers, 1, kv_heads, max_len, head_dim];
layer i's keys are slab[2i], its values slab[2i + 1] (views, so the addresses never change: what CUDA
graphs need). A pass writes its q new entries at `slots` (slot = n_past + row) and attends over the first
`n_keys` slots through its own mask; the committed length is kept here (`length`), not counted from the
slots: entries past it (a rejected tree, padding) are stale and never attended.

    SlabCache     the transformers Cache the model writes through (Cache.update -> SlabLayer.update)
    SlabPool      slabs of one target, reused: a new generation gets the slab (and the compiled graphs'
                  addresses) of the last one
    StaticKV      what new_cache() hands out: a slab while it lives, returned to the pool when dropped
    compact       keep prefix + accepted path: ONE index_select and ONE copy over all layers
    Upload        host -> device copies from a pinned buffer (no blocking copy per pass)
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import text_config


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers decoder config."""
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


class SlabLayer(CacheLayerMixin):
    """One layer's keys and values: views into the slab, written at the owner's slots."""

    is_compileable = True

    def __init__(self, owner: "SlabCache", keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.owner, self.keys, self.values = owner, keys, values
        self.device, self.is_initialized = keys.device, True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        slots = self.owner.slots
        self.keys.index_copy_(2, slots, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, slots, value_states.to(self.values.dtype))
        n = self.owner.n_keys
        return self.keys[:, :, :n], self.values[:, :, :n]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.n_keys, 0

    def get_seq_length(self) -> int:
        return self.owner.length

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlabCache(Cache):
    """The KV cache over one slab. Before a pass: `slots` (device int64 [q], where the q new entries go)
    and `n_keys` (the keys attended: the first n_keys slots); `length`: the committed entries."""

    def __init__(self, slab: torch.Tensor):
        self.slab, self.length, self.n_keys = slab, 0, slab.shape[3]
        self.slots: torch.Tensor | None = None
        super().__init__(layers=[SlabLayer(self, slab[2 * i], slab[2 * i + 1]) for i in range(slab.shape[0] // 2)])

    @property
    def max_len(self) -> int:
        return self.slab.shape[3]

    def mark_static(self) -> None:
        """Fixed addresses for torch.compile / CUDA graphs (as transformers' StaticCache marks its own)."""
        for layer in self.layers:
            torch._dynamo.mark_static_address(layer.keys)
            torch._dynamo.mark_static_address(layer.values)


def slab_bytes(config, max_len: int, dtype: torch.dtype) -> int:
    layers, heads, dim = kv_shape(config)
    return 2 * layers * heads * max_len * dim * torch.empty(0, dtype=dtype).element_size()


class SlabPool:
    """The slabs of one target: a dropped cache's slab is handed out again (same addresses, so the
    compiled graphs recorded on it replay); a new one is allocated only while all are in use."""

    def __init__(self, config, max_len: int, dtype: torch.dtype, device: torch.device):
        layers, heads, head_dim = kv_shape(config)
        self.shape = (2 * layers, 1, heads, max_len, head_dim)
        self.dtype, self.device = dtype, device
        self.free: list[SlabCache] = []
        self.allocated = 0

    def acquire(self) -> "StaticKV":
        if self.free:
            cache = self.free.pop()
        else:
            with torch.inference_mode():
                cache = SlabCache(torch.zeros(self.shape, dtype=self.dtype, device=self.device))
            cache.mark_static()
            self.allocated += 1
        cache.length, cache.slots, cache.n_keys = 0, None, cache.max_len
        handle = StaticKV(cache)
        weakref.finalize(handle, self.free.append, cache)
        return handle


class StaticKV:
    """A KV cache as the Target interface hands it out (new_cache): its slab while this object lives."""

    def __init__(self, slab: SlabCache):
        self.slab = slab

    def __repr__(self) -> str:
        return f"StaticKV(length={self.slab.length}, max_len={self.slab.max_len})"


class Upload:
    """Copies small int64 arrays to the device: on a GPU through a pinned host buffer, asynchronously
    (an event makes sure the previous copy has left the buffer before it is written again); on the CPU
    the buffer is the tensor itself."""

    def __init__(self, size: int, device: torch.device):
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.dev = torch.zeros(size, dtype=torch.int64, device=device)
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=True) if self.on_gpu else self.dev
        self.event = torch.cuda.Event() if self.on_gpu else None
        self.view = self.host.numpy()

    def hold(self) -> np.ndarray:
        """The host buffer, safe to write (the previous copy out of it is complete)."""
        if self.event is not None:
            self.event.synchronize()
        return self.view

    def send(self, n: int | None = None) -> torch.Tensor:
        """The device buffer after copying the first n entries (all: None) of the host one."""
        if not self.on_gpu:
            return self.dev if n is None else self.dev[:n]
        dev, host = (self.dev, self.host) if n is None else (self.dev[:n], self.host[:n])
        dev.copy_(host, non_blocking=True)
        self.event.record()
        return dev

    def put(self, values) -> torch.Tensor:
        """`values` (ints) on the device, [len(values)]; longer than the buffer: a plain copy."""
        values = np.asarray(values, dtype=np.int64)
        if len(values) > len(self.view):
            return torch.as_tensor(values, device=self.device)
        self.hold()[:len(values)] = values
        return self.send(len(values))


@torch.inference_mode()
def compact(cache: SlabCache, n_keep: int, path: list[int], upload: Upload) -> None:
    """Keep the first n_keep entries (prefix + root) and the accepted nodes, drop the rest.

    Accepted node k sits at slot n_keep + k; it moves to n_keep + (its rank in path): one gather of
    every layer's keys and values at once, then one copy into place (the gather is a new tensor, so
    overlapping source and destination slots are safe).
    """
    k = len(path)
    if n_keep + k > cache.length:
        raise ValueError(f"compact: keeping {n_keep} + {k} entries of a cache holding {cache.length}")
    if list(path) != list(range(k)):
        src = upload.put(n_keep + np.asarray(path, dtype=np.int64))
        cache.slab[:, :, :, n_keep:n_keep + k] = cache.slab.index_select(3, src)
    cache.length = n_keep + k

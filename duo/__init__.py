"""duo: a llama.cpp draft on the CPU and a PyTorch target on the GPU, speculative decoding with token trees."""
import os as _os

_os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing is fetched from a model hub at run time
_os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .version import __version__  # noqa: E402
__all__ = ["Engine", "Result", "DuoError", "__version__"]


def __getattr__(name):  # lazy: the draft worker process imports duo.runtime without torch
    if name in ("Engine", "Result", "DuoError"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(name)

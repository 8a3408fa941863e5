"""The user's arguments, checked before anything is downloaded or loaded: a UsageError naming the fix.

    check_model_arg(spec, role, registry)   an alias, or a path that can work as a target / draft
    sampling_params(temperature, top_p, top_k, seed)
    check_int(value, name, lo)              an integer >= lo (bool is not an integer here)
    check_engine_args(...)                  all of Engine()'s, before it loads anything
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import DuoError, UsageError
from .plan import check_mode


def check_int(value, name: str, lo: int, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise UsageError(f"{name} must be an integer >= {lo}{what}, got {value!r}")
    return value


def check_model_arg(spec: str | None, role: str, registry) -> None:
    """Fail fast with a UsageError on a model argument that cannot work, before anything is loaded.

    None and built-in aliases pass (they are fetched later); a path must exist, be readable, and be
    a GGUF file (or, for a target, a Hugging Face directory with a config.json).
    """
    if spec is None or spec in registry.models:
        return
    if not isinstance(spec, (str, os.PathLike)):
        raise UsageError(f"{role} must be a model alias or a path, not {type(spec).__name__}")
    known = ", ".join(sorted(a for a, e in registry.models.items() if e.role in (role, ""))) or "none"
    path = Path(spec).expanduser()
    if not path.exists():
        s = str(spec)
        if os.sep in s or "/" in s or s.startswith((".", "~")) or s.lower().endswith(".gguf"):
            raise UsageError(f"{role} model not found: {path} does not exist; check the path "
                             f"(or use a built-in alias: {known})")
        raise UsageError(f"unknown {role} model '{s}': not a built-in alias ({known}) and no such file or "
                         f"directory; see 'duo models list'")
    if path.is_dir():
        if role == "draft":
            raise UsageError(f"draft model {path} is a directory; the draft runs in llama.cpp and must be a "
                             f".gguf file (convert it with llama.cpp's convert_hf_to_gguf.py)")
        if not (path / "config.json").is_file():
            raise UsageError(f"target model directory {path} has no config.json; pass a Hugging Face model "
                             f"directory, a .gguf file or a built-in alias")
        if not os.access(path, os.R_OK | os.X_OK):
            raise DuoError(f"cannot read target model directory {path}: permission denied; check its permissions")
        return
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise DuoError(f"cannot read {role} model {path}: {e.strerror}; check the file and its permissions") from e
    if magic != b"GGUF":
        what = ("the draft runs in llama.cpp and must be a .gguf file (convert it with llama.cpp's "
                "convert_hf_to_gguf.py)") if role == "draft" else \
            "pass a .gguf file, a Hugging Face model directory or a built-in alias"
        raise UsageError(f"{role} model {path} is not a GGUF file (it does not start with 'GGUF'); {what}")


def sampling_params(temperature, top_p, top_k, seed):
    """Validated SamplingParams, or a UsageError naming the bad value."""
    from .sampling import SamplingError, SamplingParams
    try:
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed).validate()
    except SamplingError as e:
        raise UsageError(str(e)) from e


def check_engine_args(model, draft, device, dtype, budget, mode, width, context, plan, profile, simulate, target_model,
                      compile="auto"):
    """UsageErrors for arguments that cannot work, before anything is downloaded or loaded; returns the
    simulated accelerator (None: a real target)."""
    from . import models
    from .runtime.target import TargetError, resolve_device, resolve_dtype

    check_mode(mode)
    if compile not in ("auto", "on", "off"):
        raise UsageError(f"unknown compile setting {compile!r}: use auto, on or off")
    if budget != "auto":
        check_int(budget, "budget", 1, " (or 'auto')")
    if width is not None:
        check_int(width, "width", 1)
    if profile not in ("auto", "saved", "off"):
        raise UsageError(f"unknown profile {profile!r}: use auto, saved or off")
    check_int(context, "context", 16, " (tokens)")
    accelerator = None
    if simulate is not None:
        from .runtime.simulate import SimulationError, get_accelerator
        try:
            accelerator = get_accelerator(simulate)
        except SimulationError as e:
            raise UsageError(str(e)) from e
    if target_model is None:
        try:   # fail fast, before anything is downloaded or loaded
            resolve_dtype(dtype, resolve_device(device))
        except TargetError as e:
            raise UsageError(str(e)) from e
    registry = models.load_registry()
    check_model_arg(model, "target", registry)
    if mode != "target" and (plan is None or plan.mode != "target"):
        check_model_arg(draft, "draft", registry)
    return accelerator

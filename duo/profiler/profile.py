"""Profile files: measurements of one machine + model pair + device + dtype, and the plan they imply.

Saved as JSON under `duo.models.cache_dir() / "profiles" / "<fingerprint>.json"` (format:
configs/profile-format.md). The fingerprint hashes the *key*: the hardware (CPU model, cores, RAM
rounded to GiB, GPU names, and the target's GPU by UUID: duo.profiler.gpu_identity), the model pair (names, and size + a hash of the head and tail of the GGUF
file, or of a transformers directory's config.json) and the device and dtype. A change of any of these
means another profile; `closest_profile` says what changed since the nearest saved one. Softer facts
(library versions, GPU driver, CPU frequency) are stored too: a change there is warned about, the
profile is still used.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..draft_quant import prepare as prepare_draft
from . import cost, plans, precisions as sweep
from .inventory import Inventory
from .measured import in_loop_factors, measurements_from_profile, min_over_larger  # noqa: F401 (used by importers)

log = logging.getLogger("duo")

FORMAT = "duo-profile"
FORMAT_VERSION = 1
HEAD_TAIL = 1 << 20


class ProfileError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------- identity
def profiles_dir() -> Path:
    from .. import models
    return models.cache_dir() / "profiles"


def model_identity(name: str, path: str | Path | None) -> dict:
    """name + size + a fast content hash (size, first and last MiB) of a file; for a transformers
    directory, the hash of config.json and the total size of its weights."""
    ident: dict = {"name": name}
    if path is None:
        return ident
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        cfg = p / "config.json"
        if cfg.is_file():
            h.update(cfg.read_bytes())
        ident["size"] = sum(f.stat().st_size for f in p.iterdir()
                            if f.is_file() and f.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
    elif p.is_file():
        size = p.stat().st_size
        h.update(str(size).encode())
        with open(p, "rb") as f:
            h.update(f.read(HEAD_TAIL))
            if size > HEAD_TAIL:
                f.seek(max(HEAD_TAIL, size - HEAD_TAIL))
                h.update(f.read(HEAD_TAIL))
        ident["size"] = size
    else:
        return ident
    ident["sha256_head_tail"] = h.hexdigest()[:16]
    return ident


def profile_key(inv: Inventory, target: dict, draft: dict | None) -> dict:
    """What a profile is valid for. target / draft: model_identity dicts. A GPU target's key names its GPU(s):
    "cuda:0" is another GPU under another CUDA_VISIBLE_DEVICES (a CPU one's key has no such entry)."""
    key = {
        "cpu_model": inv.cpu_model,
        "arch": inv.arch,
        "cores": len(inv.usable_cores),
        "logical_cores": inv.logical_cores,
        "ram_gib": int(round(inv.ram_total_gib)),
        "gpus": [g.name for g in inv.gpus if g.mig_of is None],
        "device": inv.device,
        "dtype": inv.dtype,
        "target": target,
        "draft": draft,
        "format_version": FORMAT_VERSION,
    }
    if inv.target_gpus:
        key["target_gpus"] = [dict(g) for g in inv.target_gpus]
    return key


def environment(inv: Inventory) -> dict:
    """Facts that may change timings without invalidating the profile."""
    from ..version import __version__
    return {"duo": __version__, "torch": inv.torch, "torch_cuda": inv.torch_cuda, "transformers": inv.transformers,
            "llama_cpp": inv.llama_cpp, "gpu_drivers": sorted({g.driver for g in inv.gpus if g.driver}),
            "freq_max_mhz": inv.freq_max_mhz}


def fingerprint(key: dict) -> str:
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def diff(old, new, prefix: str = "") -> list[str]:
    """Human-readable differences: 'cpu_model: 'A' -> 'B''."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def key_for(target_ref, draft_ref, inv: Inventory) -> dict:
    """The key of a TargetRef / DraftRef pair (duo.models) on this inventory."""
    t = model_identity(target_ref.name, target_ref.gguf or target_ref.hf_dir)
    d = model_identity(draft_ref.name, draft_ref.gguf) if draft_ref is not None else None
    return profile_key(inv, t, d)


# ------------------------------------------------------------------------------------------- files
def profile_path(fp: str, directory: str | Path | None = None) -> Path:
    return Path(directory or profiles_dir()) / f"{fp}.json"


def save_profile(profile: dict, directory: str | Path | None = None) -> Path:
    """Write atomically to <directory>/<fingerprint>.json; returns the path."""
    path = profile_path(profile["fingerprint"], directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(profile, indent=1, default=_json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _json_default(o):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_profile(path: str | Path) -> dict | None:
    """A profile file's contents, or None (with a warning) when unreadable or of another format."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable profile %s: %s", path, e)
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        log.warning("ignoring %s: not a duo profile", path)
        return None
    if data.get("version") != FORMAT_VERSION:
        log.warning("ignoring profile %s: format version %s, this duo reads %s (run `duo profile` again)",
                    path, data.get("version"), FORMAT_VERSION)
        return None
    return data


def load_profile(fp: str, directory: str | Path | None = None) -> dict | None:
    """The saved profile with this fingerprint, or None."""
    return read_profile(profile_path(fp, directory))


def list_profiles(directory: str | Path | None = None) -> list[dict]:
    d = Path(directory or profiles_dir())
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("*.json")):
        prof = read_profile(p)
        if prof is not None:
            out.append(prof)
    return out


def closest_profile(key: dict, directory: str | Path | None = None) -> tuple[dict | None, list[str]]:
    """The saved profile for the same model names whose key differs least from `key` (newest on ties), and
    the differences (another machine, a changed model file). Profiles of other model pairs never count."""
    best, best_diff = None, []
    names = lambda k: [(k.get(r) or {}).get("name") for r in ("target", "draft")]  # noqa: E731
    for prof in list_profiles(directory):
        if names(prof.get("key", {})) != names(key):
            continue
        changes = diff(prof.get("key", {}), key)
        if best is None or (len(changes), -_created(prof)) < (len(best_diff), -_created(best)):
            best, best_diff = prof, changes
    return best, best_diff


def _created(prof: dict) -> float:
    try:
        return datetime.datetime.fromisoformat(prof.get("created", "")).timestamp()
    except (TypeError, ValueError):
        return 0.0


def check_profile(profile: dict, key: dict, env: dict | None = None) -> list[str]:
    """What differs between a profile and the current key (and environment); [] if nothing."""
    changes = diff(profile.get("key", {}), key)
    if env is not None:
        changes += diff(profile.get("environment", {}), env, "environment")
    return changes


def warn_changes(changes: list[str], what: str) -> None:
    if changes:
        log.warning("%s:\n  %s", what, "\n  ".join(changes))


# ------------------------------------------------------------------------------------------- plan
def plan_from_profile(profile: dict, mode: str = "auto", budget: int | None = None):
    """duo.plan.Plan from a profile: the predicted-fastest schedule (within `mode` / `budget`); the overlap
    schedule's draft pinned to the last cores."""
    m = measurements_from_profile(profile)
    c = plans.choose(m, mode, budget)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) != m.n_cores:
        cores = list(profile["measurements"].get("cores") or cores)
    return plans.plan_from_choice(m, c, budget, f"profile {profile['fingerprint']}", cores=cores,
                                  target_mode_budget=16)


# ------------------------------------------------------------------------------------------- profiling
def create_profile(target=None, draft=None, device: str = "auto", dtype: str = "auto", quick: bool = True,
                   prompts: str | Path | None = None, progress: bool = True, target_model=None,
                   save: bool = True, settings=None, precisions: bool = False,
                   draft_quant: str = "keep") -> tuple[dict, Path | None]:
    """Measure this machine with a model pair (precisions: the target in each precision too); returns (profile, path).

    target / draft: duo.models refs, or a spec string / None for resolve_target / resolve_draft."""
    from .. import models
    from ..runtime.target import load_target, storage_dtype
    from . import bench, calibration_prompts, inventory, timing

    t0 = time.perf_counter()
    tref = target if hasattr(target, "hf_dir") else models.resolve_target(
        target, progress=progress, dtype=storage_dtype(device, dtype))
    dref = draft if hasattr(draft, "gguf") and not hasattr(draft, "hf_dir") else \
        prepare_draft(models.resolve_draft(draft, progress=progress), draft_quant, progress)
    inv = inventory.collect(device, dtype)
    key = key_for(tref, dref, inv)
    s = settings or timing.Settings.for_mode(quick)
    prompt_list = calibration_prompts.load_prompts(prompts)
    n = len(inv.usable_cores)
    if progress:
        print(f"duo: profiling {'(quick) ' if s.quick else ''}{tref.name} + {dref.name} on {inv.device} "
              f"({n} cores)...", file=sys.stderr, flush=True)
    from ..runtime.llama_probe import DraftUnusable, llama_verdict, unusable_message
    verdict = llama_verdict(dref.gguf, refresh=True)   # which llama.cpp configuration runs here, re-measured
    if progress:
        print(f"duo: {verdict.summary()}", file=sys.stderr, flush=True)
    if verdict.chosen is None:
        raise DraftUnusable(unusable_message(verdict))
    tm = target_model or load_target(tref.hf_dir, device=device, dtype=dtype, name=tref.name, threads=n)
    models.check_vocab(dref.gguf, tm.tokenizer, dref.name, tref.name)
    meas = bench.run_benchmarks(tm, dref.gguf, prompt_list, s, progress=progress)
    meas["llama_probe"] = {"chosen": verdict.chosen, "threads": verdict.threads,
                           "variants": [dict(r.__dict__) for r in verdict.results]}
    meas.update(sweep.measure_precisions(tref, tm, prompt_list, s, meas["verify"], progress) if precisions else {})
    profile = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint": fingerprint(key),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": s.quick,
        "prompts": str(prompts) if prompts else "configs/calibration_prompts.jsonl",
        "key": key,
        "environment": environment(inv),
        "inventory": inv.to_dict(),
        "measurements": meas,
    }
    finish(profile)
    profile["wall_s"] = round(time.perf_counter() - t0, 1)
    path = save_profile(profile) if save else None
    return profile, path


def finish(profile: dict) -> None:
    """Add the choice, the per-(mode, budget) table, the predicted-vs-measured check and the precisions' predictions."""
    m = measurements_from_profile(profile)
    c = cost.choose_budget(m)
    sweep.add_predictions(profile, m, c)
    profile["choice"] = c.to_dict()
    profile["table"] = [dict(mode=r.mode, budget=r.budget, width=r.width, draft_threads=r.draft_threads,
                             target_threads=r.target_threads, expected_tokens=round(r.expected_tokens, 4),
                             round_ms=round(r.round_ms, 3), hit=round(r.hit, 4), tps=round(r.tps, 4))
                        for (_, _), r in sorted(cost.summary(c).items(), key=lambda kv: (kv[0][0], kv[0][1]))]
    acc = profile["measurements"].get("acceptance", {})
    checks = []
    for shape, r in acc.get("runs", {}).items():
        dt = min(m.draft_ms, key=lambda t: abs(t - acc.get("draft_threads", m.n_cores)))
        tt = min(m.verify_ms, key=lambda t: abs(t - acc.get("target_threads", m.n_cores)))
        row = cost.evaluate(m, "sequential", r["budget"], r["width"], dt, tt)
        checks.append(dict(shape=shape, budget=r["budget"], width=r["width"],
                           measured_tokens_per_round=round(r["tokens_per_round"], 3),
                           predicted_tokens_per_round=round(row.expected_tokens, 3),
                           measured_tps=round(r["tokens_per_s"], 3), predicted_tps=round(row.tps, 3)))
    profile["validation"] = checks


def plan_for(target_ref, draft_ref, device: str = "auto", dtype: str = "auto", mode: str = "auto",
             budget: int | None = None, quick_if_missing: bool = True, *, target_model=None,
             progress: bool = True):
    """The Plan for this machine and pair from its saved profile; profile quickly first if there is none
    (quick_if_missing), else None. Never raises for a profiling problem: warns and returns None."""
    from .. import models
    from . import inventory

    try:
        tref = target_ref if hasattr(target_ref, "hf_dir") else models.resolve_target(target_ref, progress=progress)
        dref = draft_ref if hasattr(draft_ref, "gguf") else models.resolve_draft(draft_ref, progress=progress)
        inv = inventory.collect(device, dtype)
        key = key_for(tref, dref, inv)
        prof = load_profile(fingerprint(key))
        if prof is not None:
            warn_changes(check_profile(prof, key, environment(inv)),
                         "the saved profile was measured with different software; its plan may be off "
                         "(run `duo profile` to re-measure)")
            return plan_from_profile(prof, mode, budget)
        old, changes = closest_profile(key)
        if old is not None:
            warn_changes(changes, "no profile for this machine and model pair; the closest saved one differs in")
        if not quick_if_missing:
            return None
        log.warning("no profile yet: measuring this machine (quick, about 2 minutes on 2 cores; `duo profile` runs the full one)")
        prof, _ = create_profile(tref, dref, device, dtype, quick=True, target_model=target_model, progress=progress)
        return plan_from_profile(prof, mode, budget)
    except Exception as e:  # noqa: BLE001 - the engine falls back to its defaults
        log.warning("no profile-based plan (%s: %s); using defaults", type(e).__name__, e)
        return None

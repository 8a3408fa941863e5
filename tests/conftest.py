"""Shared fixtures: a tiny random-weight target/draft pair (built locally, no downloads)."""

import os
from pathlib import Path

import pytest

# Read once at import, before any test monkeypatches DUO_CACHE: with it set, the tiny pairs are
# built once into $DUO_CACHE/tiny and reused across runs (a finished build is detected and kept).
_PERSISTENT = os.environ.get("DUO_CACHE")
# `duo run` measures a quick profile when none is saved (--profile auto); in tests that would profile the
# tiny pair in every subprocess, so they use a saved profile only. test_cli covers the auto path itself.
os.environ.setdefault("DUO_PROFILE", "saved")


def _tiny_dir(tmp_path_factory, name: str) -> Path:
    if _PERSISTENT:
        return Path(_PERSISTENT).expanduser() / "tiny" / name
    return tmp_path_factory.mktemp(f"tiny-{name}")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """TinyPair (qwen2): target.gguf, draft.gguf (noisy copy), target_hf/ (transformers)."""
    from duo.testing import build_tiny_pair

    return build_tiny_pair(_tiny_dir(tmp_path_factory, "qwen2"), arch="qwen2")


@pytest.fixture(scope="session")
def tiny_pair_llama(tmp_path_factory):
    """TinyPair (llama architecture: no q/k/v biases, permuted q/k in the GGUF)."""
    from duo.testing import build_tiny_pair

    return build_tiny_pair(_tiny_dir(tmp_path_factory, "llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_pair_soft(tmp_path_factory):
    """TinyPair with flat logits (std ~2): high-entropy distributions for sampling tests."""
    from duo.testing import build_tiny_pair

    return build_tiny_pair(_tiny_dir(tmp_path_factory, "soft"), arch="qwen2", logit_scale=2.0)


@pytest.fixture(scope="session")
def tiny_pair_q(tmp_path_factory):
    """TinyPair (qwen2, hidden 256 / ffn 768) whose draft.gguf stores its weight matrices as Q4_0:
    llama.cpp runs the draft on its quantized CPU kernels, repacked into the CPU_REPACK (or, on
    Intel CPUs with AMX, the AMX) extra buffer type. The target stays F32. Builds in a few seconds."""
    from duo.testing import build_tiny_pair
    from duo.testing.tiny_pair import QUANT_DIMS

    return build_tiny_pair(_tiny_dir(tmp_path_factory, "qwen2-q4_0"), arch="qwen2", draft_quant="q4_0", **QUANT_DIMS)


@pytest.fixture(scope="session")
def tiny_pair_q_load(tiny_pair_q):
    """llama.cpp's own account of loading tiny_pair_q's draft with its defaults (extra buffer types
    on), from a throwaway process: buffer types, repacked tensors, or the signal that killed it."""
    from duo.testing.llama_log import llama_load_report

    return llama_load_report(tiny_pair_q.draft_gguf)


@pytest.fixture(scope="session")
def extra_bufts_run(tiny_pair_q_load):
    """Skip unless llama.cpp runs the quantized draft with its extra buffer types on this CPU (tests
    that load it in-process, where a trapped AMX instruction would kill the whole session)."""
    r = tiny_pair_q_load
    if r.crashed:
        pytest.skip(f"llama.cpp with extra buffer types is {r.crashed} on this CPU loading the Q4_0 draft")
    if r.returncode != 0:
        pytest.fail(f"llama.cpp could not run the Q4_0 draft (exit code {r.returncode}):\n{r.stderr}")
    return r

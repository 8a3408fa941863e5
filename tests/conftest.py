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

"""Test helpers: a tiny random-weight target/draft pair built locally (no downloads)."""

from .tiny_pair import TinyPair, build_tiny_pair

__all__ = ["TinyPair", "build_tiny_pair"]

"""duo's version (read by the package, the CLI and the profiler's environment record)."""
__version__ = "0.1.0"

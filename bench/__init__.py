"""Benchmarks over real datasets (MT-bench, HumanEval, GSM8K), every method side by side in one run."""

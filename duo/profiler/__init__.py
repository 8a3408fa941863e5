"""Hardware profiler: measure the machine and the model pair, model the cost, pick the schedule and budget.

    inventory.py  CPU, cores, memory, GPUs (NVML), chosen torch device/dtype
    bench.py      micro-benchmarks: draft steps, target passes, channel, acceptance on calibration prompts
    cost.py       pure cost model: expected tokens per round, round time per schedule, choose_budget
    profile.py    profile files (fingerprinted), plan_from_profile, plan_for (what Engine uses)
    cli.py        `duo profile`

Imports stay lazy: the draft benchmark child process imports duo.profiler.bench without torch.
"""


def plan_for(*args, **kw):
    """See duo.profiler.profile.plan_for."""
    from .profile import plan_for as f
    return f(*args, **kw)

"""CPU time a shared host's hypervisor gives to other guests ("steal"), from /proc/stat (Linux).

On a cloud VM, a slow spell is often steal rather than the job: training
logs its share next to tokens/s, and the benches print it with their tables.
Elsewhere (no /proc/stat) every share is None.
"""
from __future__ import annotations


def cpu_times() -> list[int] | None:
    """The aggregate `cpu` line of /proc/stat in ticks, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return [int(x) for x in fields[1:]] if fields and fields[0] == "cpu" else None


def steal_share(start: list[int] | None, end: list[int] | None) -> float | None:
    """Share of all CPU time between two `cpu_times()` readings that went to steal."""
    if not start or not end or len(start) < 8 or len(end) < 8:
        return None
    delta = [b - a for a, b in zip(start[:8], end[:8])]  # user nice system idle iowait irq softirq steal
    total = sum(delta)
    return delta[7] / total if total > 0 else None


class Steal:
    """`with Steal() as s: ...`, then `s.report()`: the share of CPU time stolen in between."""

    def __enter__(self):
        self.start, self.end = cpu_times(), None
        return self

    def __exit__(self, *exc):
        self.end = cpu_times()
        return False

    def share(self) -> float | None:
        return steal_share(self.start, self.end)

    def report(self) -> str:
        s = self.share()
        return ("host steal: not available (no /proc/stat)" if s is None
                else f"host steal during the run: {s:.0%} of CPU time (time the hypervisor gave to other guests)")

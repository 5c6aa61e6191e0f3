"""CPU time a shared host's hypervisor gave to other guests ("steal") while a benchmark ran.

On a cloud VM, timings taken while steal is high are slow for reasons
outside the code under test: the benches print the share next to their
tables so a reader can tell a slow spell from a slow system.
"""
from __future__ import annotations


def _cpu_times() -> list[int] | None:
    """The aggregate `cpu` line of /proc/stat (Linux), or None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return [int(x) for x in fields[1:]] if fields and fields[0] == "cpu" else None


class Steal:
    """`with Steal() as s: ...`, then `s.report()`: the share of CPU time stolen in between."""

    def __enter__(self):
        self.start, self.end = _cpu_times(), None
        return self

    def __exit__(self, *exc):
        self.end = _cpu_times()
        return False

    def share(self) -> float | None:
        if not self.start or not self.end or len(self.start) < 8:
            return None
        delta = [b - a for a, b in zip(self.start, self.end)]
        total = sum(delta[:8])  # user nice system idle iowait irq softirq steal
        return delta[7] / total if total > 0 else None

    def report(self) -> str:
        s = self.share()
        return ("host steal: not available (no /proc/stat)" if s is None
                else f"host steal during the run: {s:.0%} of CPU time (time the hypervisor gave to other guests)")

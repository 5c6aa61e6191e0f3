"""The share of CPU time a shared host steals, from two /proc/stat readings."""
from __future__ import annotations

import math

from transduce.hoststeal import Steal, steal_share


def test_steal_share_is_steal_over_all_ticks_between_readings():
    # user nice system idle iowait irq softirq steal (guest columns after them are not added again)
    a = [100, 0, 10, 500, 0, 0, 0, 40, 7, 7]
    b = [160, 0, 20, 530, 0, 0, 0, 140, 9, 9]
    assert math.isclose(steal_share(a, b), 100 / 200)
    assert steal_share(a, a) is None              # no time passed
    assert steal_share(None, b) is None and steal_share(a, None) is None


def test_steal_report_reads_the_host():
    with Steal() as s:
        sum(range(10 ** 5))
    share = s.share()
    assert share is None or 0.0 <= share <= 1.0
    assert s.report().startswith("host steal")

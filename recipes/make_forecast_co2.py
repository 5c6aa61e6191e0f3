"""Write the series of recipes/forecast_co2.yaml: monthly mean atmospheric CO2 at Mauna Loa
(ppm, March 1958 - December 2001), from the weekly series shipped inside the statsmodels wheel
(`statsmodels.datasets.co2`; no download).

    python recipes/make_forecast_co2.py [OUT_DIR]      (default runs/co2)

Weeks are averaged per calendar month; the few months without a reading are interpolated
linearly. The final TEST_MONTHS are held out (test.csv holds them after the CONTEXT months before
them, so that every test forecast has its full context); dev.csv is the DEV_MONTHS before the
test segment, likewise with their context; train.csv is everything before dev.
"""
from __future__ import annotations

import sys
from pathlib import Path

CONTEXT = 24        # as data.forecast.context of the recipe
DEV_MONTHS = 36
TEST_MONTHS = 48


def monthly_co2():
    """(dates as YYYY-MM-01, values) of the monthly series."""
    from statsmodels.datasets import co2

    weekly = co2.load_pandas().data["co2"]
    monthly = weekly.resample("MS").mean().interpolate("linear")
    return [d.strftime("%Y-%m-%d") for d in monthly.index], [float(v) for v in monthly.values]


def write(path: Path, dates, values) -> None:
    """With the calendar month as a point on a circle (month_sin, month_cos): covariates known ahead."""
    import math

    rows = []
    for d, v in zip(dates, values):
        a = 2 * math.pi * (int(d[5:7]) - 1) / 12
        rows.append(f"{d},{v:.4f},{math.sin(a):.4f},{math.cos(a):.4f}\n")
    path.write_text("timestamp,co2,month_sin,month_cos\n" + "".join(rows), encoding="utf-8")
    print(f"{path}: {len(values)} months, {dates[0]} .. {dates[-1]}")


def main(out: str = "runs/co2") -> Path:
    dates, values = monthly_co2()
    n = len(values)
    test_start, dev_start = n - TEST_MONTHS, n - TEST_MONTHS - DEV_MONTHS
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / "train.csv", dates[:dev_start], values[:dev_start])
    write(folder / "dev.csv", dates[dev_start - CONTEXT: test_start], values[dev_start - CONTEXT: test_start])
    write(folder / "test.csv", dates[test_start - CONTEXT:], values[test_start - CONTEXT:])
    return folder


if __name__ == "__main__":
    main(*sys.argv[1:])

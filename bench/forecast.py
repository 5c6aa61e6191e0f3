"""Forecasting on a real series against the classical baselines, in one process.

    python recipes/make_forecast_co2.py                      # runs/co2/*.csv (statsmodels' co2, no download)
    nice python bench/forecast.py [--run RUN_DIR] [--plot docs/forecast_co2.png]

Trains recipes/forecast_co2.yaml into RUN_DIR unless it holds a trained run, then forecasts the
held-out final segment (test.csv: the last 48 months, after their context) 12 months ahead from
rolling origins every --stride months (default: the recipe's eval_stride), and does the same with
  - seasonal naive: each month as the same month a year before the origin;
  - Holt-Winters exponential smoothing (statsmodels ExponentialSmoothing, additive trend and
    seasonality, refitted at each origin on every month before it);
  - SARIMA(1,1,1)(0,1,1)12 (statsmodels SARIMAX, the "airline" model; refitted likewise).
MASE divides by the seasonal-naive error of the training series (the run's `mase_scale`), the
same scale for every method. Prints a Markdown table and saves the plot of forecasts vs actuals.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or "unknown CPU"


def baselines(history: np.ndarray, horizon: int, season: int) -> dict:
    """Each baseline's forecast (and where it has one, its 80% interval) after `history`."""
    from statsmodels.tsa.holtwinters import ExponentialSmoothing
    from statsmodels.tsa.statespace.sarimax import SARIMAX

    out = {"seasonal naive": (np.array([history[len(history) - season + (h % season)] for h in range(horizon)]), None)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hw = ExponentialSmoothing(history, trend="add", seasonal="add", seasonal_periods=season).fit()
        out["Holt-Winters (ETS)"] = (hw.forecast(horizon), None)
        fit = SARIMAX(history, order=(1, 1, 1), seasonal_order=(0, 1, 1, season)).fit(disp=False)
        f = fit.get_forecast(horizon)
        out["SARIMA(1,1,1)(0,1,1)"] = (f.predicted_mean, f.conf_int(alpha=0.2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(ROOT / "recipes/forecast_co2.yaml"))
    ap.add_argument("--run", default=str(ROOT / "runs/forecast_co2"), help="run directory (trained if empty)")
    ap.add_argument("--plot", default=str(ROOT / "docs/forecast_co2.png"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    ap.add_argument("--stride", type=int, help="months between forecast origins (default: the run's eval_stride)")
    args = ap.parse_args()

    from transduce.data.series import read_series
    from transduce.metrics import forecast_metrics
    from transduce.registry import load_config
    from transduce.runs import load_run
    from transduce.tasks.forecast import interval_levels
    from transduce.training.trainer import train

    cfg = load_config(args.recipe, args.set)
    run_dir = Path(args.run)
    train_s = None
    if not (run_dir / "checkpoints").is_dir():
        t = time.monotonic()
        train(cfg, run_dir, progress=False)
        train_s = time.monotonic() - t
    run = load_run(run_dir, engine="torch")
    fc = run.config.data.forecast
    task = run.task
    test = read_series(run.config.data.test, fc)
    train_series = read_series(run.config.data.train, fc)
    dev = read_series(run.config.data.dev, fc)
    col = run.target.columns[0]
    # dev.csv and test.csv begin with the CONTEXT months before their own segment
    sys.path.insert(0, str(ROOT / "recipes"))
    from make_forecast_co2 import CONTEXT

    # the whole series before each origin, for the baselines: train, dev after its context, test
    before = np.concatenate([train_series.select([col])[:, 0], dev.select([col])[CONTEXT:, 0]])
    y_test = test.select([col])[:, 0]
    x = task.inputs([test], run.source)[0]
    stride = args.stride or fc.eval_stride or fc.horizon
    origins = [o for o in task.origins(len(x), dataclasses.replace(fc, eval_stride=stride))
               if o >= CONTEXT]  # the held-out segment only
    actual = np.stack([y_test[t: t + fc.horizon] for t in origins])[..., None]      # (W, H, 1)

    t = time.monotonic()
    ours = task.forecast(run, [x[o - fc.context: o] for o in origins], fc.horizon)
    ours_s = time.monotonic() - t
    lo, hi = interval_levels(fc.interval)
    results = {"transduce forecaster": (ours.point, {q: ours.quantiles[q] for q in (lo, 0.5, hi)}, ours_s)}
    fits: dict = {}
    t_all = {}
    for o in origins:
        history = np.concatenate([before, y_test[CONTEXT: o]])
        t = time.monotonic()
        for name, (point, band) in baselines(history, fc.horizon, fc.season).items():
            fits.setdefault(name, []).append((point, band))
        t_all[o] = time.monotonic() - t
    for name, parts in fits.items():
        point = np.stack([p for p, _ in parts])[..., None]
        band = None
        if parts[0][1] is not None:
            band = {lo: np.stack([b[:, 0] for _, b in parts])[..., None], 0.5: point,
                    hi: np.stack([b[:, 1] for _, b in parts])[..., None]}
        results[name] = (point, band, None)

    metrics = ["mase", "mae", "rmse", "quantile_loss", "coverage"]
    rows = []
    for name, (point, band, secs) in results.items():
        m = forecast_metrics(metrics, actual, point, band or {}, run.target.mase_scale)
        if band is None:
            m["quantile_loss"] = m["coverage"] = None
        rows.append((name, m))
    cmd = "nice python bench/forecast.py" + "".join(f" --set {s}" for s in args.set) + (
        f" --stride {args.stride}" if args.stride else "")
    print(f"\nCPU: {cpu_name()}; {len(origins)} origins x {fc.horizon} months of {test.path} "
          f"({test.times[CONTEXT]} .. {test.times[-1]}); command: {cmd}")
    if train_s is not None:
        print(f"training: {train_s / 60:.1f} min ({run.state.get('step')} updates)")
    print("\n| method | MASE | MAE (ppm) | RMSE (ppm) | quantile loss (80% band) | coverage of 80% interval |")
    print("|---|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    cov = lambda v: "-" if v is None else f"{v:.0f}%"  # noqa: E731
    for name, m in rows:
        print(f"| {name} | {fmt(m['mase'])} | {fmt(m['mae'])} | {fmt(m['rmse'])} | {fmt(m['quantile_loss'])} | "
              f"{cov(m['coverage'])} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    steps = np.arange(len(y_test))
    ax.plot(steps, y_test, color="black", lw=1.4, label="actual")
    styles = {"transduce forecaster": "tab:red", "seasonal naive": "tab:gray", "Holt-Winters (ETS)": "tab:blue",
              "SARIMA(1,1,1)(0,1,1)": "tab:green"}
    shown = [k for k, o in enumerate(origins) if (o - CONTEXT) % fc.horizon == 0]  # a year apart: no overlap
    for name, (point, band, _) in results.items():
        for k in shown:
            o = origins[k]
            span = steps[o: o + fc.horizon]
            ax.plot(span, point[k, :, 0], color=styles[name], lw=1.1, ls="-" if "transduce" in name else "--",
                    label=name if k == shown[0] else None)
            if name == "transduce forecaster":
                ax.fill_between(span, band[lo][k, :, 0], band[hi][k, :, 0], color=styles[name], alpha=0.18,
                                label="transduce 80% interval" if k == shown[0] else None)
    ticks = list(range(0, len(y_test), 12))
    ax.set_xticks(ticks, [test.times[i][:7] for i in ticks])
    ax.set_ylabel(f"{col} (ppm)")
    ax.set_title(f"Mauna Loa CO2, monthly: {fc.horizon}-month forecasts on the held-out last {len(y_test) - CONTEXT} "
                 f"months (scored from {len(origins)} origins, {len(shown)} drawn)", fontsize=10)
    ax.axvline(CONTEXT - 0.5, color="black", lw=0.6, ls=":")
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()

"""The benchmarks (bench/) run end to end at toy size and print their tables: they are run by hand,
so nothing else would notice one of them breaking. Nothing here is timed or compared."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from toyrun import toy_data, toy_raw, write_config

ROOT = Path(__file__).resolve().parents[2]


def bench(script: str, *args, cwd: Path = ROOT) -> str:
    """Run bench/SCRIPT with ARGS; its stdout (a failure shows its stderr)."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def table(out: str) -> list[dict]:
    """The rows of the first Markdown table in `out`, as {header: cell}."""
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1]) <= set("|-: "), lines[1]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A trained toy run (gated feed-forward blocks, as the G2P recipe's) with a test split, its
    config and three step checkpoints kept."""
    folder = tmp_path_factory.mktemp("bench")
    data = toy_data(folder, 400)
    raw = toy_raw(data, max_steps=30, save_every=10, keep_checkpoints=3, deterministic=False)
    raw["data"]["test"] = str(data)
    raw["model"]["activation"] = "geglu"
    raw["eval"]["metrics"] = ["wer", "per"]
    config = write_config(folder / "toy.yaml", raw)
    run = folder / "run"
    subprocess.run([sys.executable, "-m", "transduce", "train", str(config), "--out", str(run)], check=True,
                   capture_output=True, timeout=600)
    return config, run


def test_train_throughput(toy):
    config, _ = toy
    out = bench("train_throughput.py", "--config", config, "--steps", 2, "--warmup", 1, "--repeat", 1, "--pairs", 8,
                "--threads", 1)
    rows = {r["system"]: r for r in table(out)}
    assert {"transduce fp32", "HF BART fp32"} <= set(rows)
    assert all(number(r["tokens/s"]) > 0 for r in rows.values())
    assert "HF BART: GELU feed-forward 48 wide for our geglu at ff_dim 32" in out  # the gated model's peer
    ratio = re.search(r"ratio transduce fp32 / HF BART fp32: ([\d.]+)x", out)
    assert ratio and float(ratio.group(1)) > 0


def test_decode_speed(toy):
    _, run = toy
    out = bench("decode_speed.py", "--model", run, "--limit", 30, "--batch", 10, "--repeat", 1, "--threads", 1,
                "--int8")
    rows = table(out)
    systems = ["transduce float32", "transduce int8", "CTranslate2 float32", "CTranslate2 int8",
               "HF generate (BART, matched steps)"]
    assert [(r["system"], r["beam"]) for r in rows] == [(s, b) for b in ("1", "5") for s in systems]
    assert all(number(r["words/s"]) > 0 for r in rows)
    wer = {(r["system"], r["beam"]): r["test WER %"] for r in rows}
    assert all(0 <= number(w) <= 100 for k, w in wer.items() if not k[0].startswith("HF"))
    # the same weights exported: CTranslate2's float32 greedy words are ours
    assert wer[("transduce float32", "1")] == wer[("CTranslate2 float32", "1")]
    assert re.search(r"beam 5: transduce int8 / CTranslate2 int8 = [\d.]+x", out)


def test_controls_speed(toy):
    _, run = toy
    out = bench("controls_speed.py", "--model", run, "--limit", 30, "--batch", 10, "--repeat", 1, "--threads", 1)
    rows = {r["decoding"]: r for r in table(out)}
    assert set(rows) == {"unconstrained", "1 constraint per word",
                         "processors (min length, no-repeat 3-gram, a banned phoneme)"}
    assert all(number(r["words/s"]) > 0 for r in rows.values())
    assert "every constrained output contains its constraint: True" in out


def test_quality(toy, tmp_path):
    _, run = toy
    out = bench("quality.py", "--minutes", 0.03, "--ours", run, "--out", tmp_path / "hf", "--threads", 1)
    rows = table(out)
    assert [(r["system"], r["beam"]) for r in rows] == [("transduce", "1"), ("HF BART", "1"), ("transduce", "5"),
                                                       ("HF BART", "5")]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["minutes"] == 0.03 and len(result["rows"]) == 4
    assert all(0 <= scores["wer"] <= 100 for _, _, scores in result["rows"])


def test_averaging(toy):
    _, run = toy
    rows = table(bench("averaging.py", "--model", run, "--last", "1,3"))
    assert [r["last N"] for r in rows] == ["1", "3"]
    assert rows[0]["from"] == "step-0000030" and rows[1]["from"] == "step-0000010 .. step-0000030"
    assert all(0 <= number(r["test wer"]) <= 100 for r in rows)


def test_data_scale(tmp_path):
    # the G2P recipe's model on a TSV made from CMUdict (3,000 pairs here, 5 million in the benchmark)
    out = bench("data_scale.py", "--pairs", 3000, "--steps", 2, "--threads", 1, "--out", tmp_path / "scale")
    assert len((tmp_path / "scale" / "train3000.tsv").read_text().splitlines()) == 3000
    (row,) = table(out)
    assert number(row["seconds to first step"]) > 0
    assert 0 < number(row["peak RSS to first step (GiB)"]) <= number(row["peak RSS (GiB)"])


def test_families(toy, tmp_path):
    config, _ = toy
    out = bench("families.py", "--minutes", 0.03, "--recipes", config, "--out", tmp_path / "families", "--threads", 1)
    (row,) = table(out)
    assert row["family"] == "transformer" and 0 <= number(row["WER %"]) <= 100
    assert (tmp_path / "families" / "toy" / "checkpoints" / "index.json").exists()


def test_quality_schedule_follows_the_clock_as_ours():
    """HF's learning rate in bench/quality.py: the recipe's linear schedule over a time budget decays
    with the clock from the end of warmup, as the trainer's does (not to its floor right after warmup)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from quality import ClockSchedule
    finally:
        sys.path.remove(str(ROOT / "bench"))
    from transduce.registry import load_config
    from transduce.training.schedule import lr_at

    for schedule in ("linear", "cosine"):
        tc = load_config(ROOT / "recipes" / "g2p_cmudict.yaml", [f"train.schedule={schedule}"]).train
        assert tc.max_steps == 0 and tc.warmup_steps == 150 and tc.max_minutes == 10
        s = ClockSchedule(tc, 10)
        assert s.lr(0, 0.0) == lr_at(0, tc)  # warmup by the update
        for step in range(1, 150):
            s.stepped(step, step * 0.1)
        assert s.lr(149, 14.9) == tc.lr * 150 / 150
        s.stepped(150, 15.0)  # warmup ends 15 s into 600
        assert s.lr(150, 15.0) == pytest.approx(tc.lr)
        half = 15.0 + (600 - 15.0) / 2
        assert s.lr(5000, half) == pytest.approx(lr_at(5000, tc, progress=0.5))  # the clock, not the updates
        assert s.lr(5000, half) > 0.4 * tc.lr
        assert s.lr(9000, 600.0) == pytest.approx(tc.lr * tc.min_lr_ratio)
    tc = load_config(ROOT / "recipes" / "g2p_cmudict.yaml", ["train.max_steps=1000"]).train
    s = ClockSchedule(tc, 10)
    s.stepped(150, 1.0)
    assert s.lr(575, 2.0) == pytest.approx(lr_at(575, tc))  # max_steps: by the update


def test_forecast(tmp_path):
    # statsmodels' co2 series, a forecaster trained for 20 updates, the baselines from 4 origins
    sys.path.insert(0, str(ROOT / "recipes"))
    from make_forecast_co2 import main as make_co2

    data = make_co2(str(tmp_path / "co2"))
    sets = [f"data.{s}={data / s}.csv" for s in ("train", "dev", "test")] + [
        "train.max_steps=20", "train.eval_every=10", "train.warmup_steps=5", "train.threads=1"]
    out = bench("forecast.py", "--run", tmp_path / "run", "--plot", tmp_path / "plot.png", "--stride", 12,
                *[a for s in sets for a in ("--set", s)])
    rows = {r["method"]: r for r in table(out)}
    assert list(rows) == ["transduce forecaster", "seasonal naive", "Holt-Winters (ETS)", "SARIMA(1,1,1)(0,1,1)"]
    assert all(number(r["MASE"]) > 0 for r in rows.values())
    assert number(rows["Holt-Winters (ETS)"]["MASE"]) < number(rows["seasonal naive"]["MASE"])  # co2 trends
    assert "4 origins x 12 months" in out and (tmp_path / "plot.png").stat().st_size > 10_000

"""bench/serve_load.py end to end on a toy run for a few seconds: its output has every row and
figure docs/serving.md reports. Nothing here is timed or compared."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")

from toyrun import toy_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_serve_load_reports_levels_overload_and_ratios(tmp_path):
    run = toy_run(tmp_path, max_steps=40)
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_load.py"), "--model", str(run),
                        "--clients", "1,4", "--duration", "1", "--requests", "40", "--threads", "1",
                        "--max-queue", "2", "--json", str(tmp_path / "r.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "r.json").read_text())
    assert [(r["mode"], r["clients"]) for r in result["levels"]] == [("batched", 1), ("batched", 4),
                                                                     ("naive", 1), ("naive", 4)]
    for r in result["levels"] + [result["overload"]]:
        assert {"words_per_s", "p50_ms", "p99_ms", "statuses", "answered"} <= set(r)
        assert 0 < r["answered"] <= (80 if r is result["overload"] else 40)
    o = result["overload"]
    assert o["clients"] == 2 * o["saturating_clients"] and o["only_200_503"] is True
    assert set(o["statuses"]) <= {"200", "503"} and o["queue_max"] <= 2
    assert set(result["ratios"]) == {"batched_vs_offline", "batched_vs_naive"} and result["offline_words_per_s"] > 0
    assert "| offline translate |" in p.stdout and "| overload |" in p.stdout

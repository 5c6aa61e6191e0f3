"""Load on `transduce serve` over loopback: throughput and latency of one-line requests from N
concurrent clients, against offline `translate` and a server that decodes each request alone.

    python bench/serve_load.py --model runs/g2p [--clients 1,8,32,128] [--duration 10] [--requests 2000]
                               [--threads 2] [--max-queue 64] [--limit 2000]

Each level runs until `--requests` answers or `--duration` seconds, whichever comes first; the
load generator (httpx, asyncio) stops by itself. Inputs are the sources of the run's test split
(`--limit` of them), each client sending one at a time. Rows:
- offline: `inference.translate` of the inputs in process, as `transduce translate` decodes them
  (same threads and decode.workers), words/s after a warm-up;
- batched: `transduce serve` as configured; naive: the same with `--max-batch-tokens 0` (each request
  decoded alone);
- overload: twice the saturating clients (the level of most words/s), `--max-queue` as given;
  a refused client waits 50 ms before its next request. Counts every status (only 200 and 503 are
  expected), the largest queue seen in /metrics, p99 of the accepted, and how long after the burst
  a lone request is answered within 2x the one-client p50 again.
Prints a Markdown table and a JSON line (`--json FILE` also writes it). The client shares the
CPU with the server: on a small machine its own cost lowers every server row alike.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """`transduce serve --model RUN ARGS` on a free port, ready when entered."""

    def __init__(self, model: str, *args: str):
        self.args = ["--model", model, *args]

    def __enter__(self):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "transduce", "serve", "--port", str(port), *self.args],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transduce serve exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("transduce serve did not get ready in 120 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def load(url: str, words: list[str], clients: int, requests: int, duration: float,
               watch_queue: bool = False) -> dict:
    """`clients` loops each sending one word at a time until `requests` answers or `duration` s."""
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    sent = 0
    queue_max = 0.0
    stop_at = time.monotonic() + duration

    async def client(c: httpx.AsyncClient, k: int):
        nonlocal sent
        while sent < requests and time.monotonic() < stop_at:
            word = words[(sent * 7919 + k) % len(words)]
            sent += 1
            t0 = time.perf_counter()
            try:
                r = await c.post("/v1/translate", json={"inputs": [word]})
                code = str(r.status_code)
            except httpx.HTTPError as e:
                code = type(e).__name__
            statuses[code] = statuses.get(code, 0) + 1
            if code == "200":
                latencies.append(time.perf_counter() - t0)
            elif code == "503":
                await asyncio.sleep(0.05)

    async def watcher(c: httpx.AsyncClient):
        nonlocal queue_max
        while time.monotonic() < stop_at and sent < requests:
            text = (await c.get("/metrics")).text
            for line in text.splitlines():
                if line.startswith("transduce_queue_size "):
                    queue_max = max(queue_max, float(line.split()[-1]))
            await asyncio.sleep(0.1)

    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        tasks = [client(c, k) for k in range(clients)] + ([watcher(c)] if watch_queue else [])
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
    ok = statuses.get("200", 0)
    return {"clients": clients, "answered": sum(statuses.values()), "statuses": statuses,
            "seconds": round(elapsed, 2), "words_per_s": round(ok / elapsed, 1),
            "p50_ms": round(1000 * percentile(latencies, 50), 1), "p99_ms": round(1000 * percentile(latencies, 99), 1),
            **({"queue_max": queue_max} if watch_queue else {})}


def recovery(url: str, word: str, target_s: float, within: float = 30.0) -> float | None:
    """Seconds until a lone request is answered within `target_s` again (None if not within `within`)."""
    # one client and connection, as the measured clients keep theirs (a new httpx client per request
    # costs more than the request)
    with httpx.Client(base_url=url, timeout=60) as client:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < within:
            s = time.perf_counter()
            r = client.post("/v1/translate", json={"inputs": [word]})
            if r.status_code == 200 and time.perf_counter() - s <= target_s:
                return round(time.perf_counter() - t0, 2)
            time.sleep(0.05)
    return None


def offline(model: str, words: list[str], threads: int | None, repeat: int = 2) -> float:
    """Words/s of `translate` on `words` in process (best of `repeat`, after a warm-up)."""
    import torch

    from transduce.inference import translate
    from transduce.runs import load_decoding_run

    if threads:
        torch.set_num_threads(threads)
    run = load_decoding_run([model])
    translate(run, words[:50])
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        translate(run, words)
        best = max(best, len(words) / (time.perf_counter() - t0))
    return round(best, 1)


def inputs(model: str, limit: int) -> list[str]:
    from transduce.data.pipeline import group_references, load_splits
    from transduce.runs import run_config

    splits = load_splits(run_config(model).data)
    sources, _ = group_references(splits.test or splits.dev)
    sources = [s for s in sources if s.strip()]
    return sources[:limit] if limit else sources


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="run directory")
    p.add_argument("--clients", default="1,8,32,128", help="comma-separated concurrent clients per level")
    p.add_argument("--duration", type=float, default=10.0, help="most seconds per level")
    p.add_argument("--requests", type=int, default=2000, help="most requests per level")
    p.add_argument("--threads", type=int, help="torch threads of the server and the offline decoding")
    p.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue")
    p.add_argument("--limit", type=int, default=2000, help="inputs taken from the test split (0 = all)")
    p.add_argument("--naive-clients", help="levels for the naive server (default: those of --clients)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)

    words = inputs(args.model, args.limit)
    levels = [int(x) for x in args.clients.split(",")]
    threads = ["--threads", str(args.threads)] if args.threads else []
    result = {"cpu": cpu_name(), "cores": os.cpu_count(), "command": "python bench/serve_load.py " +
              " ".join(argv if argv is not None else sys.argv[1:]), "inputs": len(words),
              "offline_words_per_s": offline(args.model, words, args.threads), "levels": []}
    server_args = [*threads, "--max-queue", str(args.max_queue)]
    for mode, extra, ns in (("batched", [], levels),
                            ("naive", ["--max-batch-tokens", "0"],
                             [int(x) for x in (args.naive_clients or args.clients).split(",")])):
        with Served(args.model, *server_args, *extra) as s:
            for n in ns:
                row = asyncio.run(load(s.url, words, n, args.requests, args.duration))
                result["levels"].append({"mode": mode, **row})
                print(f"{mode} {n} clients: {row}", file=sys.stderr, flush=True)
            if mode == "batched":
                best = max((r for r in result["levels"] if r["mode"] == "batched"), key=lambda r: r["words_per_s"])
                one = next((r for r in result["levels"] if r["mode"] == "batched" and r["clients"] == 1), best)
                burst = asyncio.run(load(s.url, words, 2 * best["clients"], 2 * args.requests, args.duration,
                                         watch_queue=True))
                burst["recovery_s"] = recovery(s.url, words[0], 2 * one["p50_ms"] / 1000)
                burst["saturating_clients"] = best["clients"]
                burst["p99_vs_saturation"] = round(burst["p99_ms"] / best["p99_ms"], 2) if best["p99_ms"] else None
                burst["only_200_503"] = set(burst["statuses"]) <= {"200", "503"}
                result["overload"] = burst
                print(f"overload: {burst}", file=sys.stderr, flush=True)
    batched = max((r["words_per_s"] for r in result["levels"] if r["mode"] == "batched"), default=0)
    naive = max((r["words_per_s"] for r in result["levels"] if r["mode"] == "naive"), default=0)
    result["ratios"] = {"batched_vs_offline": round(batched / result["offline_words_per_s"], 2),
                        "batched_vs_naive": round(batched / naive, 2) if naive else None}
    print(table(result))
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(r: dict) -> str:
    rows = ["| mode | clients | words/s | p50 ms | p99 ms | statuses |", "|---|---:|---:|---:|---:|---|",
            f"| offline translate | - | {r['offline_words_per_s']:,.1f} | - | - | - |"]
    for x in r["levels"]:
        rows.append(f"| {x['mode']} | {x['clients']} | {x['words_per_s']:,.1f} | {x['p50_ms']} | {x['p99_ms']} | "
                    + ", ".join(f"{k}: {v}" for k, v in sorted(x["statuses"].items())) + " |")
    o = r.get("overload")
    if o:
        rows.append(f"| overload | {o['clients']} | {o['words_per_s']:,.1f} | {o['p50_ms']} | {o['p99_ms']} | "
                    + ", ".join(f"{k}: {v}" for k, v in sorted(o["statuses"].items())) + " |")
    out = "\n".join(rows)
    if o:
        out += (f"\n\nOverload at {o['clients']} clients (2x the saturating {o['saturating_clients']}): largest queue "
                f"{o['queue_max']:g}, p99 {o['p99_vs_saturation']}x saturation's, a lone request back to 2x the "
                f"one-client p50 {o['recovery_s']} s after the burst.")
    ratios = r["ratios"]
    out += (f"\n\nBatched at saturation: {ratios['batched_vs_offline']}x offline translate, "
            f"{ratios['batched_vs_naive']}x the naive server. {r['cpu']}, {r['cores']} cores; `{r['command']}`.")
    return out


if __name__ == "__main__":
    main()

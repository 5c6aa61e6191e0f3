"""`transduce serve` as a user runs it: a uvicorn process on 127.0.0.1, concurrent clients over
loopback: batching merges them, overload is 503 and recovers, deadlines are 504, SIGTERM drains."""
from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")
import httpx  # noqa: E402

from serving import Server, metric  # noqa: E402
from toyrun import toy_run  # noqa: E402

WORDS = ["a b c", "h g f e", "d", "c a b d e f g", "b b", "e f g h a", "a h", "g f"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return toy_run(tmp_path_factory.mktemp("live"), max_steps=80)


async def _all(url: str, bodies: list[dict], timeout: float = 60):
    async with httpx.AsyncClient(base_url=url, timeout=timeout,
                                 limits=httpx.Limits(max_connections=len(bodies))) as c:
        return await asyncio.gather(*(c.post("/v1/translate", json=b) for b in bodies))


def test_concurrent_clients_share_batches(run):
    with Server("--model", f"toy={run}", "--max-wait-ms", "100", "--threads", "1") as s:
        alone = httpx.post(s.url + "/v1/translate", json={"inputs": WORDS}).json()["outputs"]
        before = metric(httpx.get(s.url + "/metrics").text, 'transduce_batch_size_count{model="toy"}')
        bodies = [{"inputs": [w]} for w in WORDS * 4]
        responses = asyncio.run(_all(s.url, bodies))
        assert all(r.status_code == 200 for r in responses)
        assert [r.json()["outputs"][0]["text"] for r in responses] == [o["text"] for o in alone] * 4
        after = metric(httpx.get(s.url + "/metrics").text, 'transduce_batch_size_count{model="toy"}')
        assert after - before < len(bodies) / 2, (before, after)
        assert httpx.get(s.url + "/health").status_code == 200


def test_overload_is_503_then_recovers(run):
    with Server("--model", f"toy={run}", "--max-queue", "4", "--max-batch-tokens", "8", "--max-wait-ms", "0",
                "--threads", "1") as s:
        bodies = [{"inputs": [w] * 16, "beam": 4} for w in WORDS * 8]
        responses = asyncio.run(_all(s.url, bodies))
        codes = [r.status_code for r in responses]
        assert set(codes) == {200, 503}, sorted(set(codes))
        refused = next(r for r in responses if r.status_code == 503)
        assert refused.headers["retry-after"] == "1"
        text = httpx.get(s.url + "/metrics").text
        assert metric(text, 'transduce_requests_total{endpoint="/v1/translate",status="503"}') == codes.count(503)
        assert metric(text, "transduce_queue_size") == 0
        assert httpx.post(s.url + "/v1/translate", json={"inputs": ["a b"]}).status_code == 200


def test_past_the_deadline_is_504_and_not_decoded(run):
    with Server("--model", f"toy={run}", "--timeout-s", "0.001", "--max-wait-ms", "50") as s:
        before = metric(httpx.get(s.url + "/metrics").text, 'transduce_batch_size_count{model="toy"}')
        r = httpx.post(s.url + "/v1/translate", json={"inputs": ["a b c"]})
        assert r.status_code == 504 and "--timeout-s" in r.json()["error"]
        assert metric(httpx.get(s.url + "/metrics").text, 'transduce_batch_size_count{model="toy"}') == before


def test_sigterm_finishes_in_flight_requests_and_exits_0(run):
    s = Server("--model", f"toy={run}", "--threads", "1", "--max-batch-tokens", "4")
    result = {}

    def slow():  # 240 batches of about one input at beam 16: in flight when the signal comes
        result["r"] = httpx.post(s.url + "/v1/translate", json={"inputs": WORDS * 30, "beam": 16}, timeout=60)

    try:
        t = threading.Thread(target=slow)
        t.start()
        while metric(httpx.get(s.url + "/metrics").text, 'transduce_batch_size_count{model="toy"}') < 2:
            time.sleep(0.01)
        assert "r" not in result, "the request finished before the signal; make it longer"
        s.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert s.proc.wait(60) == 0
    finally:
        s.stop()
    r = result["r"]
    assert r.status_code == 200 and len(r.json()["outputs"]) == len(WORDS) * 30
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health")

"""`transduce serve` in process: every endpoint, every error status, outputs equal to the commands',
and the batcher's merging, queue bound, deadlines and cancellation (FastAPI's TestClient, or httpx
on the ASGI app for concurrent requests)."""
from __future__ import annotations

import asyncio
import dataclasses
import io
import random
import re
import time
from contextlib import redirect_stdout

import pytest

pytest.importorskip("fastapi", reason="the 'serve' extra is not installed")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from toyrun import toy_run  # noqa: E402
from transduce.config import DecodeConfig  # noqa: E402
from transduce.registry import config_from_dict  # noqa: E402
from transduce.serve import schema  # noqa: E402
from transduce.serve.app import create_app  # noqa: E402
from transduce.serve.batcher import Batcher, ClientGone, DeadlineExceeded, Overloaded  # noqa: E402
from transduce.serve.defaults import Limits  # noqa: E402
from transduce.serve.metrics import Metrics  # noqa: E402
from transduce.serve.run import load_models, parse_spec  # noqa: E402
from transduce.training.trainer import train  # noqa: E402

WORDS = ["a b c", "h g f e", "", "d", "c a b d e f g", "b b", "e f g h a"]


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two toy seq2seq runs (an ensemble's members), a classifier, a tagger and a language model,
    each trained for a few seconds."""
    root = tmp_path_factory.mktemp("serve")
    out = {"toy": toy_run(root / "a", max_steps=150), "toy2": toy_run(root / "b", max_steps=60, seed=2)}
    g = random.Random(0)
    seqs = [[g.choice("abcdefgh") for _ in range(g.randint(3, 7))] for _ in range(300)]
    cls = _write(root / "cls.tsv", [" ".join(q) + "\t" + ("spam" if "a" in q else "ham") for q in seqs])
    tag = _write(root / "tag.tsv", [" ".join(q) + "\t" + " ".join("X" if t in "ab" else "O" for t in q)
                                    for q in seqs])
    lm = _write(root / "lm.txt", ["abcdefgh"[i: i + 4] for i in range(5)] * 40)
    tiny = {"d_model": 16, "heads": 2, "ff_dim": 32, "dropout": 0.0, "max_positions": 32}
    steps = {"batch_tokens": 400, "lr": 3e-3, "warmup_steps": 5, "max_steps": 20, "eval_every": 0,
             "log_every": 10, "threads": 1}
    for name, model, data in (
            ("cls", {"family": "encoder_classifier", "encoder_layers": 1, **tiny},
             {"train": str(cls), "dev": str(cls), "source_tokenizer": {"kind": "whitespace"}}),
            ("tag", {"family": "encoder_tagger", "encoder_layers": 1, **tiny},
             {"train": str(tag), "dev": str(tag), "source_tokenizer": {"kind": "whitespace"}}),
            ("lm", {"family": "decoder_only", "layers": 1, **tiny},
             {"train": str(lm), "dev": str(lm), "format": "text", "target_tokenizer": {"kind": "char"},
              "max_target_len": 24})):
        raw = {"model": model, "data": data, "train": steps}
        if name == "lm":
            raw["eval"] = {"metrics": ["ppl"]}
        train(config_from_dict(raw), root / name, progress=False)
        out[name] = root / name
    return out


def served(runs, *specs, **limits):
    specs = specs or (f"toy={runs['toy']}",)
    return create_app(load_models(list(specs)), Limits(**limits))


def ready(client: TestClient) -> None:
    for _ in range(200):
        if client.get("/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("not ready")


@pytest.fixture(scope="module")
def client(runs):
    app = served(runs, f"toy={runs['toy']}", f"ens={runs['toy']},{runs['toy2']}", f"cls={runs['cls']}",
                 f"tag={runs['tag']}", f"lm={runs['lm']}", max_inputs=20, max_chars=40, max_input_tokens=12,
                 max_beam=8)
    with TestClient(app) as c:
        ready(c)
        yield c


def cli(*args) -> str:
    from transduce.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


def lines_file(tmp_path, lines):
    return str(_write(tmp_path / "in.txt", lines))


# -- endpoints --------------------------------------------------------------------------------------

def test_health_ready_models_page(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"toy", "ens", "cls", "tag", "lm"}
    assert models["toy"]["family"] == "transformer" and models["toy"]["attention"] is True
    assert models["ens"]["ensemble"] == 2 and models["ens"]["attention"] is False
    assert models["cls"]["endpoints"] == ["classify"] and models["tag"]["endpoints"] == ["tag"]
    assert "generate" in models["lm"]["endpoints"]
    decoding = models["toy"]["decoding"]
    assert {k: decoding[k] for k in ("beam", "nbest", "length_penalty", "max_len_a", "max_len_b")} == {
        "beam": 1, "nbest": 1, "length_penalty": 1.0, "max_len_a": 1.5, "max_len_b": 10}
    assert decoding["constraints"] == [] and decoding["min_length"] == 0  # the output's controls too
    assert models["toy"]["parameters"] > 0 and models["toy"]["source_vocab"] == 12
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "/static/app.js" in page.text
    assert "http" not in re.sub(r"<!doctype[^>]*>", "", page.text)  # nothing from a CDN
    assert "drawHeatmap" in client.get("/static/app.js").text


def test_decoding_options_are_decodeconfigs_fields():
    fields = [f.name for f in dataclasses.fields(DecodeConfig)]
    assert schema.decode_options() == [f for f in fields if f not in schema.SERVER_SIDE]
    assert set(schema.decode_options()) <= set(schema.TranslateRequest.model_fields)
    assert set(schema.generate_options()) == {"beam", "num", "sampling", "temperature", "top_k", "top_p",
                                               "seed", "max_len"}


@pytest.mark.parametrize("options,flags", [({}, []), ({"beam": 3, "nbest": 2}, ["--beam", "3", "--nbest", "2"]),
                                           ({"beam": 4}, ["--beam", "4"])])
def test_translate_equals_the_translate_command(client, runs, tmp_path, options, flags):
    r = client.post("/v1/translate", json={"model": "toy", "inputs": WORDS, **options})
    assert r.status_code == 200
    outputs = r.json()["outputs"]
    want = cli("translate", "--model", str(runs["toy"]), "--input", lines_file(tmp_path, WORDS), *flags)
    got = ["\t".join(h["text"] for h in o["hypotheses"]) if options.get("nbest", 1) > 1 else o["text"]
           for o in outputs]
    assert got == want.splitlines()
    assert len(outputs) == len(WORDS)
    assert all(len(o["hypotheses"]) == options.get("nbest", 1) for w, o in zip(WORDS, outputs) if w)
    assert outputs[2]["hypotheses"] == [{"text": "", "score": 0.0, "logprob": 0.0}]  # empty in, one empty out
    best = outputs[0]["hypotheses"]
    assert best == sorted(best, key=lambda h: -h["score"])


def test_ensemble_equals_translate_of_several_runs(client, runs, tmp_path):
    r = client.post("/v1/translate", json={"model": "ens", "inputs": WORDS, "beam": 3})
    want = cli("translate", "--model", str(runs["toy"]), str(runs["toy2"]), "--beam", "3",
               "--input", lines_file(tmp_path, WORDS))
    assert [o["text"] for o in r.json()["outputs"]] == want.splitlines()


def test_options_change_the_decoding(client):
    short = client.post("/v1/translate", json={"model": "toy", "inputs": ["c a b d e f g"], "max_len_a": 0,
                                               "max_len_b": 1}).json()["outputs"][0]["text"]
    assert len(short.split()) <= 1


def test_decoding_controls_in_a_request(client):
    r = client.post("/v1/translate", json={"model": "toy", "inputs": ["a b c", "d e"], "beam": 3,
                                           "constraints": ["h h"], "banned": ["a"], "token_scores": True,
                                           "alignments": True})
    assert r.status_code == 200, r.text
    for o in r.json()["outputs"]:
        h = o["hypotheses"][0]
        words = h["text"].split()
        assert "h h" in h["text"] and "a" not in words
        assert len(h["token_logprobs"]) == len(words) + 1 and len(h["alignment"].split()) == len(words)
    bad = client.post("/v1/translate", json={"model": "toy", "inputs": ["a"], "constraints": ["zz"]})
    assert bad.status_code == 422 and "'zz'" in bad.text


def test_attention_of_the_best_output(client):
    out = client.post("/v1/translate", json={"model": "toy", "inputs": ["a b c"], "attention": True}).json()
    att = out["outputs"][0]["attention"]
    assert att["source_tokens"] == ["a", "b", "c"]
    assert att["output_tokens"] == out["outputs"][0]["text"].split() + ["</s>"]
    assert len(att["weights"]) == len(att["output_tokens"])
    assert all(len(row) == 3 and abs(sum(row) - 1) < 1e-2 for row in att["weights"])


def test_classify_tag_score_generate_equal_their_commands(client, runs, tmp_path):
    lines = ["a b c", "", "d e f", "h a"]
    for endpoint in ("classify", "tag"):
        model = "cls" if endpoint == "classify" else "tag"
        out = client.post(f"/v1/{endpoint}", json={"model": model, "inputs": lines}).json()["outputs"]
        want = cli(endpoint, "--model", str(runs[model]), "--input", lines_file(tmp_path, lines)).splitlines()
        if endpoint == "tag":
            out = [" ".join(line.split()) + "\t" + " ".join(t) if t else "" for line, t in zip(lines, out)]
        assert out == want
    pairs = ["a b c\tc b a", "d e\te d"]
    out = client.post("/v1/score", json={"model": "toy", "inputs": pairs}).json()["outputs"]
    want = cli("score", "--model", str(runs["toy"]), "--input", lines_file(tmp_path, pairs)).splitlines()
    assert [f"{v:.6f}" for v in out] == want
    for options, flags in (({"max_len": 4}, ["--max-len", "4"]),
                           ({"sampling": True, "seed": 3, "num": 2, "top_p": 0.9},
                            ["--sample", "--seed", "3", "--num", "2", "--top-p", "0.9"])):
        out = client.post("/v1/generate", json={"model": "lm", "prompt": "bc", **options}).json()["outputs"]
        assert out == cli("generate", "--model", str(runs["lm"]), "--prompt", "bc", *flags).splitlines()


# -- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("path,body,status,message", [
    ("/v1/translate", {"model": "nope", "inputs": ["a"]}, 404, "unknown model 'nope'; valid choices: toy, ens, cls"),
    ("/v1/translate", {"inputs": ["a"]}, 422, "give \"model\""),
    ("/v1/translate", {"model": "toy", "inputs": ["a"], "bem": 2}, 422,
     "unknown option 'bem'; valid options: model, inputs, attention, beam, nbest, length_penalty"),
    ("/v1/translate", {"model": "toy", "inputs": ["a"], "workers": 2}, 422, "unknown option 'workers'"),
    ("/v1/translate", {"model": "toy", "inputs": ["a"], "beam": "wide"}, 422, "beam: Input should be a valid integer"),
    ("/v1/translate", {"model": "toy", "inputs": ["a"], "beam": 2, "nbest": 3}, 422, "need 1 <= nbest <= beam"),
    ("/v1/translate", {"model": "toy", "inputs": ["a"], "beam": 9}, 422, "at most 8 (--max-beam)"),
    ("/v1/translate", {"model": "toy", "inputs": []}, 422, "inputs: List should have at least 1 item"),
    ("/v1/translate", {"model": "toy"}, 422, "inputs: Field required"),
    ("/v1/translate", {"model": "toy", "inputs": ["a"] * 21}, 413, "21 inputs; at most 20 per request (--max-inputs)"),
    ("/v1/translate", {"model": "toy", "inputs": ["a", "a " * 30]}, 413,
     "inputs[1]: 60 characters; at most 40 per input (--max-chars)"),
    ("/v1/translate", {"model": "toy", "inputs": ["a b c d e f g h a b c d e"]}, 413,
     "inputs[0]: 13 tokens; at most 12 per input (--max-input-tokens)"),
    ("/v1/translate", {"model": "ens", "inputs": ["a"], "attention": True}, 422, "no cross-attention"),
    ("/v1/translate", {"model": "cls", "inputs": ["a"]}, 422, "has no /v1/translate; its endpoints: /v1/classify"),
    ("/v1/classify", {"model": "toy", "inputs": ["a"]}, 422, "has no /v1/classify"),
    ("/v1/score", {"model": "toy", "inputs": ["a b"]}, 422, "inputs[0]: score: 'a b': expected source<TAB>target"),
    ("/v1/generate", {"model": "lm", "prompt": "a", "sampling": True, "beam": 2}, 422, "it takes no beam"),
    ("/v1/generate", {"model": "lm", "prompt": "a", "num": 9}, 422, "num 9: at most 8"),
])
def test_errors_say_what_is_wrong(client, path, body, status, message):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_malformed_json_is_422(client):
    r = client.post("/v1/translate", content=b'{"inputs": [', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"].startswith("malformed JSON")
    assert client.get("/v1/nothing").status_code == 404


def test_metrics_count_requests_batches_and_tokens(client):
    client.post("/v1/translate", json={"model": "toy", "inputs": ["a b c", "d e"]})
    text = client.get("/metrics").text
    assert re.search(r'transduce_requests_total\{endpoint="/v1/translate",status="200"\} [1-9]', text)
    assert re.search(r'transduce_requests_total\{endpoint="/v1/translate",status="413"\} [1-9]', text)
    for name in ("transduce_queue_size", 'transduce_batch_size_count{model="toy"}',
                 'transduce_queue_seconds_count{model="toy"}', 'transduce_inference_seconds_count{model="toy"}',
                 'transduce_tokens_in_total{model="toy"}', 'transduce_tokens_out_total{model="toy"}'):
        assert re.search(re.escape(name) + r" [0-9.e+]+", text), name
    assert float(re.search(r'transduce_tokens_in_total\{model="toy"\} ([0-9.e+]+)', text).group(1)) >= 5


def test_model_specs():
    assert parse_spec("runs/g2p") == ("g2p", ["runs/g2p"])
    assert parse_spec("big=runs/a,runs/b") == ("big", ["runs/a", "runs/b"])
    with pytest.raises(ValueError, match="no run directory"):
        parse_spec("x=")


# -- batching, limits, deadlines --------------------------------------------------------------------

async def _concurrently(app, requests: list[dict], slow_s: float = 0.0, path="/v1/translate"):
    """Responses of `requests` sent at once to `app` (decoding slowed by `slow_s` per batch)."""
    import transduce.serve.app as server

    real = server._translator
    if slow_s:

        def slow(m, cfg, attention):
            fn = real(m, cfg, attention)
            return lambda inputs: (time.sleep(slow_s), fn(inputs))[1]

        server._translator = slow
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                         timeout=60) as c:
                return await asyncio.gather(*(c.post(path, json=r) for r in requests)), \
                    (await c.get("/metrics")).text
    finally:
        server._translator = real


def batches(metrics: str) -> float:
    return float(re.search(r'transduce_batch_size_count\{model="toy"\} ([0-9.e+]+)', metrics).group(1))


def test_concurrent_requests_share_batches_and_keep_their_outputs(runs, client):
    words = [" ".join(random.Random(i).choice("abcdefgh") for _ in range(1 + i % 6)) for i in range(24)]
    alone = [o["text"] for o in client.post("/v1/translate", json={"model": "toy", "inputs": words[:20]}).json()
             ["outputs"]] + [o["text"] for o in client.post("/v1/translate", json={"model": "toy",
                                                                                    "inputs": words[20:]}).json()
                             ["outputs"]]
    app = served(runs, max_wait_ms=200)
    responses, metrics = asyncio.run(_concurrently(app, [{"inputs": [w]} for w in words]))
    assert [r.json()["outputs"][0]["text"] for r in responses] == alone
    assert batches(metrics) < len(words) / 2  # they were merged
    naive = served(runs, max_batch_tokens=0, max_wait_ms=200)
    responses, metrics = asyncio.run(_concurrently(naive, [{"inputs": [w]} for w in words]))
    assert batches(metrics) == len(words) and [r.json()["outputs"][0]["text"] for r in responses] == alone


def test_batches_group_similar_lengths_within_the_token_budget():
    b = Batcher(Metrics(), max_batch_tokens=12, max_wait_s=0, max_queue=100)

    async def take():
        await b.start()
        for n in (1, 6, 2, 5, 1, 6, 2):
            b.submit(("k",), lambda x: x, ["x" * n], [n], "m", 100, 10)
        first, rest = b._take(), list(b.pending)  # before the dispatcher runs
        await b.stop()
        return [it.length for it in first], [it.length for it in rest]

    first, rest = asyncio.run(take())
    assert first == [1, 1, 2, 2]          # the oldest (1) with its nearest in length, 4 x 2 <= 12 tokens
    assert sorted(rest) == [5, 6, 6]


def test_full_queue_is_503_with_retry_after_then_recovers(runs):
    app = served(runs, max_batch_tokens=3, max_queue=2, max_wait_ms=0)
    responses, metrics = asyncio.run(_concurrently(app, [{"inputs": ["a b c"]}] * 8, slow_s=0.2))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503} and codes.count(200) >= 2  # at least the queue's 2
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "--max-queue" in refused.json()["error"]
    assert 'reason="queue_full"' in metrics
    responses, _ = asyncio.run(_concurrently(app, [{"inputs": ["a b c"]}]))
    assert responses[0].status_code == 200


def test_deadline_is_504_and_its_work_is_dropped(runs):
    app = served(runs, max_batch_tokens=3, timeout_s=0.3, max_wait_ms=0)
    responses, metrics = asyncio.run(_concurrently(app, [{"inputs": ["a b c"]}, {"inputs": ["d e f"]}],
                                                   slow_s=0.6))
    assert sorted(r.status_code for r in responses) == [504, 504]
    assert "--timeout-s" in responses[0].json()["error"]
    assert batches(metrics) == 1  # the second request's input never decoded
    assert 'reason="deadline"' in metrics


def test_a_client_that_leaves_cancels_its_work():
    decoded = []
    b = Batcher(Metrics(), max_batch_tokens=100, max_wait_s=0, max_queue=10)

    def slow(inputs):
        time.sleep(0.3)
        decoded.extend(inputs)
        return inputs

    async def go():
        await b.start()
        first = b.submit(("k",), slow, ["first"], [1], "m", 1, 10)
        await asyncio.sleep(0.05)  # "first" is decoding
        second = b.submit(("k",), slow, ["second"], [1], "m", 1, 10)
        gone = asyncio.Event()

        async def disconnected():
            await gone.wait()

        waiting = asyncio.ensure_future(b.wait(second, disconnected))
        gone.set()
        with pytest.raises(ClientGone):
            await waiting
        assert await b.wait(first) == ["first"]
        await b.stop()
        return b.pending, b.waiting

    pending, waiting = asyncio.run(go())
    assert decoded == ["first"] and not pending and not waiting


def test_overloaded_and_deadline_in_the_batcher():
    b = Batcher(Metrics(), max_batch_tokens=1, max_wait_s=0, max_queue=1)

    async def go():
        await b.start()
        b.submit(("k",), lambda x: (time.sleep(0.2), x)[1], ["a"], [1], "m", 1, 10)
        await asyncio.sleep(0.02)
        late = b.submit(("k",), lambda x: x, ["b"], [1], "m", 1, 0.05)
        with pytest.raises(Overloaded):
            b.submit(("k",), lambda x: x, ["c"], [1], "m", 1, 10)
        with pytest.raises(DeadlineExceeded):
            await b.wait(late)
        b.submit(("k",), lambda x: x, ["d"], [1], "m", 1, 10)  # room again
        await b.stop()

    asyncio.run(go())

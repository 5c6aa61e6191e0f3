"""The HTTP application: routes, limits and errors, over the batcher (`create_app`), and
`serve` that runs it with uvicorn.

Every error is JSON `{"error": message}` with its status: 404 unknown model, 413 a size limit,
422 a bad request (malformed JSON, unknown option, invalid value), 503 the queue is full (with
Retry-After), 504 past the deadline; never a hang.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from transduce.serve import schema
from transduce.serve.defaults import Limits
from transduce.serve.batcher import Batcher, ClientGone, DeadlineExceeded, Overloaded
from transduce.serve.metrics import Metrics
from transduce.serve.run import ServedModel, attention_of, probe_attention

log = logging.getLogger("transduce")
STATIC = Path(__file__).parent / "static"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def create_app(models: dict[str, ServedModel], limits: Limits | None = None, warm: bool = True) -> FastAPI:
    """The server of `models` (name -> model). `warm`: decode one input per model at start, so
    that /ready waits for kernels and caches; it is not ready before."""
    limits = limits or Limits()
    metrics = Metrics()
    batcher = Batcher(metrics, limits.max_batch_tokens, limits.max_wait_ms / 1000, limits.max_queue,
                      limits.workers)
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        loop = asyncio.get_running_loop()
        warming = loop.run_in_executor(None, _warm_up, models, warm)
        warming.add_done_callback(lambda f: state.update(ready=f.exception() is None))
        yield
        await batcher.stop()

    app = FastAPI(title="transduce", lifespan=lifespan,
                  description="Trained transduce runs over HTTP, decoded in dynamic batches.")
    app.state.batcher, app.state.metrics, app.state.models, app.state.limits = batcher, metrics, models, limits
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    app.add_middleware(_Counted, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        return JSONResponse({"error": _validation_message(request, e.errors()), "details": _jsonable(e.errors())},
                            status_code=422)

    # -- the page and the state ---------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not state["ready"]:
            return JSONResponse({"status": "starting", "error": "models are warming up"}, status_code=503)
        return {"status": "ready", "models": list(models)}

    @app.get("/v1/models")
    async def list_models():
        return {"models": [m.describe(schema.decode_options()) for m in models.values()]}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- decoding -----------------------------------------------------------------------------------
    async def submit(request: Request, m: ServedModel, endpoint: str, key: tuple, fn, inputs: list[str],
                     lengths: list[int]) -> list:
        try:
            job = batcher.submit((m.name, endpoint) + key, fn, inputs, lengths, m.name,
                                 m.run.config.decode.batch_size, limits.timeout_s)
        except Overloaded as e:
            raise ApiError(503, str(e), {"Retry-After": str(e.retry_after)}) from None
        try:
            return await batcher.wait(job, lambda: _disconnect(request))
        except DeadlineExceeded:
            raise ApiError(504, f"not answered within {limits.timeout_s:g} s (--timeout-s); its work was "
                                "dropped") from None
        except ClientGone:
            raise ApiError(499, "the client closed the connection") from None
        except ValueError as e:  # bad input found while decoding (DataError is one)
            raise ApiError(422, str(e)) from None

    def check_inputs(m: ServedModel, inputs: list[str]) -> list[int]:
        if len(inputs) > limits.max_inputs:
            raise ApiError(413, f"{len(inputs)} inputs; at most {limits.max_inputs} per request (--max-inputs)")
        for i, text in enumerate(inputs):
            if len(text) > limits.max_chars:
                raise ApiError(413, f"inputs[{i}]: {len(text)} characters; at most {limits.max_chars} "
                                    "per input (--max-chars)")
        lengths = [m.length(t) for t in inputs]
        for i, n in enumerate(lengths):
            if n > limits.max_input_tokens:
                raise ApiError(413, f"inputs[{i}]: {n} tokens; at most {limits.max_input_tokens} per input "
                                    "(--max-input-tokens)")
        return lengths

    def pick(name: str | None, endpoint: str) -> ServedModel:
        if name is None:
            if len(models) != 1:
                raise ApiError(422, f"give \"model\": this server holds several; valid choices: {', '.join(models)}")
            name = next(iter(models))
        if name not in models:
            raise ApiError(404, f"unknown model {name!r}; valid choices: {', '.join(models)}")
        m = models[name]
        if endpoint not in m.endpoints:
            raise ApiError(422, f"model {name!r} ({m.family}) has no /v1/{endpoint}; its endpoints: "
                                + ", ".join(f"/v1/{e}" for e in m.endpoints))
        return m

    @app.post("/v1/translate")
    async def translate(body: schema.TranslateRequest, request: Request):
        m = pick(body.model, "translate")
        options = schema.set_options(body, schema.decode_options())
        cfg = dataclasses.replace(m.run.config.decode, **options)
        try:
            cfg.validate()
        except ValueError as e:
            raise ApiError(422, str(e)) from None
        if max(cfg.beam, cfg.nbest) > limits.max_beam:
            raise ApiError(422, f"beam {cfg.beam}, nbest {cfg.nbest}: at most {limits.max_beam} (--max-beam)")
        if body.attention and not m.attention:
            raise ApiError(422, f"model {m.name!r} has no cross-attention to show (see \"attention\" in "
                                "GET /v1/models)")
        lengths = check_inputs(m, body.inputs)
        fn = _translator(m, cfg, body.attention)
        outputs = await submit(request, m, "translate", (tuple(sorted(options.items())), body.attention), fn,
                               body.inputs, lengths)
        metrics.tokens_out.labels(m.name).inc(sum(o.pop("_tokens") for o in outputs))
        return {"model": m.name, "outputs": outputs}

    @app.post("/v1/generate")
    async def generate(body: schema.GenerateRequest, request: Request):
        from transduce.inference import generate as generate_

        m = pick(body.model, "generate")
        options = schema.set_options(body, schema.generate_options())
        for k in ("beam", "num"):
            if options.get(k, 1) > limits.max_beam:
                raise ApiError(422, f"{k} {options[k]}: at most {limits.max_beam} (--max-beam)")
        lengths = check_inputs(m, [body.prompt])
        out = await submit(request, m, "generate", (id(body),),
                           lambda prompts: [generate_(m.run, p, **options) for p in prompts], [body.prompt], lengths)
        return {"model": m.name, "outputs": out[0]}

    def labelling(endpoint: str):
        async def handler(body: schema.InputsRequest, request: Request):
            m = pick(body.model, endpoint)
            lengths = check_inputs(m, body.inputs)
            task, run = m.run.task, m.run
            if endpoint == "score":
                for i, line in enumerate(body.inputs):
                    try:
                        task.score_ids(run, line)
                    except ValueError as e:
                        raise ApiError(422, f"inputs[{i}]: {e}") from None
                fn = lambda lines: task.score(run, lines, len(lines))  # noqa: E731
            else:
                fn = lambda lines: task.predict(run, lines, len(lines))  # noqa: E731
            out = await submit(request, m, endpoint, (), fn, body.inputs, lengths)
            return {"model": m.name, "outputs": out}
        handler.__name__ = endpoint
        return handler

    for endpoint in ("classify", "tag", "score"):
        app.post(f"/v1/{endpoint}")(labelling(endpoint))
    return app


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone: once the body is read, the server's next ASGI message is
    the disconnect (no polling)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Counted:
    """Counts requests by endpoint (the route's path) and status, and times them (plain ASGI, so the
    handlers still see a client disconnect)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or (
                "/static" if scope.get("path", "").startswith("/static/") else "unmatched")
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.request_time.labels(endpoint).observe(time.perf_counter() - t0)


def _translator(m: ServedModel, cfg, attention: bool):
    """inputs -> their n-best as `transduce translate` decodes them, with these decoding settings."""
    from transduce.inference import decode, output_text, pharaoh

    run = dataclasses.replace(m.run, config=dataclasses.replace(m.run.config, decode=cfg))

    def hypothesis(text: str, h) -> dict:
        d = {"text": output_text(run, text, h), "score": round(h.score, 6), "logprob": round(h.logprob, 6)}
        if h.token_logprobs is not None and cfg.token_scores:
            d["token_logprobs"] = [round(x, 6) for x in h.token_logprobs]
        if h.alignment is not None:  # decode.alignments: Pharaoh source-target pairs
            d["alignment"] = pharaoh(h)
        return d

    def fn(inputs: list[str]) -> list[dict]:
        out = []
        for text, hyps in zip(inputs, decode(run, inputs, batch_size=len(inputs), workers=1)):
            o = {"hypotheses": [hypothesis(text, h) for h in hyps], "_tokens": len(hyps[0].tokens)}
            o["text"] = o["hypotheses"][0]["text"]
            if attention:
                o["attention"] = attention_of(run, text, o["text"])
            out.append(o)
        return out
    return fn


def _warm_up(models: dict[str, ServedModel], warm: bool) -> None:
    """Load the kernels and decode one input per model (its caches), then say whether each shows
    attention."""
    from transduce import kernels
    from transduce.inference import decode

    kernels.ops()
    for m in models.values():
        probe_attention(m)
        if warm:
            sample = next((s for s in m.run.source.vocab.itos[4:] if s.strip()), "a")
            if m.can_decode:
                decode(m.run, [sample], workers=1)
            else:
                m.run.task.predict(m.run, [sample], 1)
    log.info("ready: %s", ", ".join(models))


def _validation_message(request: Request, errors) -> str:
    """One line for the client: the first problem, with the valid fields for an unknown one."""
    from transduce.serve.schema import GenerateRequest, InputsRequest, TranslateRequest

    body = {"/v1/translate": TranslateRequest, "/v1/generate": GenerateRequest}.get(request.url.path, InputsRequest)
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown option {where!r}; valid options: {', '.join(schema.request_fields(body))}")
        elif e.get("type") == "json_invalid":
            parts.append(f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
        else:
            parts.append(f"{where or 'body'}: {e.get('msg')}")
    return "; ".join(parts) or "invalid request"


def _jsonable(errors) -> list:
    def plain(v):
        return list(v) if isinstance(v, tuple) else v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
    return [{k: plain(v) for k, v in e.items() if k in ("type", "loc", "msg")} for e in errors]


def serve(models: dict[str, ServedModel], limits: Limits, host: str = "127.0.0.1", port: int = 8080,
          threads: int | None = None) -> int:
    """Run the server until SIGTERM or Ctrl-C: then it stops accepting, finishes what is in flight
    and returns 0."""
    import signal

    import torch
    import uvicorn

    threads = threads or torch.get_num_threads()
    torch.set_num_threads(max(1, threads // limits.workers))  # each decoding thread gets its share
    app = create_app(models, limits)
    # uvicorn re-raises the signal it shut down on once it is done; ignoring it then makes the exit 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=int(limits.timeout_s) + 5)
    uvicorn.Server(config).run()
    return 0

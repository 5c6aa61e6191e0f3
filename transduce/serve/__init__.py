"""`transduce serve`: trained runs behind HTTP (FastAPI + uvicorn), decoded in dynamic batches.

run.py loads the served runs and says what each does; schema.py the request bodies (decoding
options derived from `DecodeConfig`); batcher.py the queue, its limits and the batches; metrics.py
the Prometheus metrics; app.py the routes and the page (static/). Needs the `serve` extra.
"""

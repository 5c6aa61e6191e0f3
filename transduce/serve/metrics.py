"""Prometheus metrics of one server (a registry of its own, so that several apps in one process,
as in tests, count apart)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a millisecond to a minute.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Inputs per batch.
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("transduce_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.queue_size = Gauge("transduce_queue_size", "requests waiting for a batch", registry=r)
        self.in_flight = Gauge("transduce_batches_in_flight", "batches being decoded", registry=r)
        self.batch_size = Histogram("transduce_batch_size", "inputs per decoded batch", ["model"],
                                    buckets=SIZE_BUCKETS, registry=r)
        self.queue_time = Histogram("transduce_queue_seconds", "time an input waited before its batch started",
                                    ["model"], buckets=TIME_BUCKETS, registry=r)
        self.inference_time = Histogram("transduce_inference_seconds", "time to decode one batch", ["model"],
                                        buckets=TIME_BUCKETS, registry=r)
        self.request_time = Histogram("transduce_request_seconds", "time to answer a request", ["endpoint"],
                                      buckets=TIME_BUCKETS, registry=r)
        self.tokens_in = Counter("transduce_tokens_in", "source tokens decoded", ["model"], registry=r)
        self.tokens_out = Counter("transduce_tokens_out", "output tokens written (best outputs)", ["model"],
                                  registry=r)
        self.rejected = Counter("transduce_rejected", "requests refused or dropped, by reason",
                                ["reason"], registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)

"""The server's limits and their defaults (no web framework imported: the CLI's help reads them)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Limits:
    max_batch_tokens: int = 4096   # source tokens per batch, padded (0: each request decoded alone)
    max_wait_ms: float = 5.0       # longest an input waits for others to join its batch
    max_queue: int = 256           # requests waiting for a batch; beyond it 503
    timeout_s: float = 30.0        # a request's deadline; past it 504
    max_inputs: int = 256          # inputs per request (413)
    max_chars: int = 2000          # characters per input (413)
    max_input_tokens: int = 512    # source tokens per input (413)
    max_beam: int = 32             # beam, nbest and generate's num (422)
    workers: int = 1               # decoding threads (`serve` gives the first model's decode.workers)


LIMITS = dataclasses.asdict(Limits())

"""`budgetune serve RUN [RUN ...]`: trained adapters behind the HTTP API, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import os

from budgetune.cli.inference import PRECISION_HELP
from budgetune.cli.parsing import parse, parser

API_KEY_ENV = "BUDGETUNE_API_KEY"  # the default of --api_key


def serve_parser() -> argparse.ArgumentParser:
    p = parser("serve", "Serve trained adapters over HTTP: POST /v1/classify, GET /v1/adapters, /health, /metrics, "
               "a page at / and the API docs at /docs. Runs sharing a base model share its weights in memory.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder or adapter folder, as NAME=PATH to choose "
                   "the adapter's name (default: the run folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one, printed)")
    p.add_argument("--api_key", default=os.environ.get(API_KEY_ENV),
                   help=f"require this key on every API request (default: ${API_KEY_ENV}; none: no auth)")
    p.add_argument("--max_texts", type=int, default=64, help="texts per request (default 64)")
    p.add_argument("--max_chars", type=int, default=2000, help="characters kept per text; longer texts are cut "
                   "and the answer says so (default 2000)")
    p.add_argument("--max_body_bytes", type=int, default=1 << 20, help="request body size (default 1 MiB)")
    p.add_argument("--batch_wait_ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others (default 5)")
    p.add_argument("--max_batch_tokens", type=int, default=4096,
                   help="a batch stops gathering at this many tokens (default 4096)")
    p.add_argument("--no_dynamic_batching", action="store_true", help="run every request on its own")
    p.add_argument("--max_queue_texts", type=int, default=1024, help="texts admitted and not yet answered; a "
                   "request past it is refused at once with 503 and Retry-After (default 1024, at least --max_texts)")
    p.add_argument("--request_timeout", type=float, default=30.0, help="seconds a request may wait for its turn on "
                   "the model; past it, 503 and Retry-After (default 30; a request whose batch has started is "
                   "answered)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    p.add_argument("--precision", default="auto", help=PRECISION_HELP + "; several adapters sharing one base run "
                   "unmerged, so not in int8")
    p.add_argument("--log_level", default="warning", help="uvicorn's log level (default warning)")
    return p


def serve_command(argv: list[str]) -> int:
    """Checks every flag and run folder before anything loads, then serves; a drained shutdown exits 0."""
    from budgetune.serve.api import ServeOptions, run_server

    a = parse(serve_parser(), argv)
    options = ServeOptions(api_key=a.api_key or None, max_texts=a.max_texts, max_chars=a.max_chars,
                           max_body_bytes=a.max_body_bytes, batch_wait_ms=a.batch_wait_ms,
                           max_batch_tokens=a.max_batch_tokens, dynamic_batching=not a.no_dynamic_batching,
                           max_queue_texts=a.max_queue_texts, request_timeout=a.request_timeout)
    run_server(a.runs, options, host=a.host, port=a.port, device=a.device, log_level=a.log_level,
               precision=a.precision)
    return 0

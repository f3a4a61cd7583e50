"""The server's counters and histograms, written in Prometheus' text exposition format (version 0.0.4).

Every update happens on the event loop's thread (request middleware, handlers, the batcher's loop), so plain
dictionaries need no lock; the model thread hands its forward counts over with each batch's logits.

Label values never come from the client as sent: methods, paths and fields outside a fixed set are counted as
`other`, so no request can add a time series.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
FIELDS = frozenset({"texts", "text_pair", "adapter", "body", "Authorization", "Content-Type"})
REJECTIONS = ("queue_full", "timeout")


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


def field_label(field: str | None) -> str:
    """'texts[3]' -> 'texts'; a field outside the request's own (an unknown JSON key) -> 'other'."""
    if not field:
        return ""
    head = re.match(r"[^\[.]*", field).group(0)
    return head if head in FIELDS else "other"


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    esc = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, esc)) + "}"


def _num(v: float) -> str:
    return "+Inf" if v == math.inf else repr(float(v)) if isinstance(v, float) else str(v)


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus expects."""

    def __init__(self, buckets: Sequence[float]):
        self.bounds = (*buckets, math.inf)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_num(b)}"}} {c}' for b, c in zip(self.bounds, self.counts)]
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class Metrics:
    """Requests, texts, errors, refusals, in-flight requests, forwards, classify latency and batch sizes."""

    def __init__(self):
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)  # (method, path, status)
        self.texts: dict[str, int] = defaultdict(int)  # by adapter (a served one)
        self.errors: dict[tuple[str, str], int] = defaultdict(int)  # (status, field)
        self.rejected: dict[str, int] = dict.fromkeys(REJECTIONS, 0)  # 503s for load, by reason
        self.forwards: Counter[str] = Counter()  # model calls by kind, added here as each batch returns
        self.in_flight = 0
        self.abandoned = 0  # /v1/classify requests whose client hung up first: their texts left the queue
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_texts = Histogram(SIZE_BUCKETS)
        self.batch_requests = Histogram(SIZE_BUCKETS)

    def count_request(self, method: str, path: str, status: int) -> None:
        """`path`: a route of the app or 'other' (the caller maps it)."""
        self.requests[(method_label(method), path, str(status))] += 1

    def count_error(self, status: int, field: str | None) -> None:
        self.errors[(str(status), field_label(field))] += 1

    def render(self, queue_texts: int = 0) -> str:
        out = ["# HELP budgetune_requests_total HTTP requests answered, by method, path and status.",
               "# TYPE budgetune_requests_total counter"]
        out += [f"budgetune_requests_total{_labels([('method', m), ('path', p), ('status', s)])} {n}"
                for (m, p, s), n in sorted(self.requests.items())]
        out += ["# HELP budgetune_texts_total Texts classified, by adapter.", "# TYPE budgetune_texts_total counter"]
        out += [f"budgetune_texts_total{_labels([('adapter', a)])} {n}" for a, n in sorted(self.texts.items())]
        out += ["# HELP budgetune_errors_total Error responses, by status and the request field at fault.",
                "# TYPE budgetune_errors_total counter"]
        out += [f"budgetune_errors_total{_labels([('status', s), ('field', f)])} {n}"
                for (s, f), n in sorted(self.errors.items())]
        out += ["# HELP budgetune_rejected_total Requests refused for load (503): the text queue was full "
                "(queue_full) or the request waited past --request_timeout (timeout).",
                "# TYPE budgetune_rejected_total counter"]
        out += [f"budgetune_rejected_total{_labels([('reason', r)])} {n}" for r, n in self.rejected.items()]
        out += ["# HELP budgetune_abandoned_total /v1/classify requests whose client closed the connection before "
                "the answer: their texts left the queue uncomputed.", "# TYPE budgetune_abandoned_total counter",
                f"budgetune_abandoned_total {self.abandoned}"]
        out += ["# HELP budgetune_requests_in_flight Requests received and not yet answered.",
                "# TYPE budgetune_requests_in_flight gauge", f"budgetune_requests_in_flight {self.in_flight}",
                "# HELP budgetune_queue_texts Texts admitted to /v1/classify and not yet answered "
                "(at most --max_queue_texts).", "# TYPE budgetune_queue_texts gauge",
                f"budgetune_queue_texts {queue_texts}"]
        out += ["# HELP budgetune_forwards_total Model calls, by kind: merged (an adapter alone on its base), "
                "mixed (several LoRA adapters in one call), single (one adapter on a shared base).",
                "# TYPE budgetune_forwards_total counter"]
        out += [f"budgetune_forwards_total{_labels([('kind', k)])} {n}" for k, n in sorted(self.forwards.items())]
        for name, hist, text in (
                ("budgetune_classify_latency_seconds", self.latency, "Time from the request's body to the answer of /v1/classify (every status)."),
                ("budgetune_batch_texts", self.batch_texts, "Texts per model batch (all requests gathered)."),
                ("budgetune_batch_requests", self.batch_requests, "Requests gathered into one model batch.")):
            out += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *hist.lines(name)]
        return "\n".join(out) + "\n"

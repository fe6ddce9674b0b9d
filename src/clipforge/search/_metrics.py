"""Request counters and latency histograms, rendered in Prometheus' text exposition format.

Written by hand (a few dozen lines) rather than adding prometheus_client as a dependency.
"""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict

# Latency bucket upper bounds in seconds (Prometheus client's defaults, plus finer low end).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    """Cumulative-bucket histogram of observations (not thread-safe alone; Metrics holds the lock)."""

    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last slot: +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        """The ``_bucket``, ``_sum`` and ``_count`` sample lines."""
        sep = "," if labels else ""
        out, running = [], 0
        for bound, count in zip(self.buckets + (float("inf"),), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.total!r}", f"{name}_count{braces} {self.count}"]
        return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Metrics:
    """Per-route request/error counts and latencies, plus the encoder's batch sizes."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batches: dict[str, Histogram] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency under its route template (never the raw path)."""
        with self._lock:
            self.requests[(route, method, status)] += 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, kind: str, size: int) -> None:
        """Record one batched call of ``size`` queries of ``kind`` (text, image, knn:image, knn:text)."""
        with self._lock:
            self.batches.setdefault(kind, Histogram(BATCH_BUCKETS)).observe(size)

    def render(self) -> str:
        """All metrics in Prometheus text format 0.0.4."""
        with self._lock:
            lines = ["# HELP clipforge_http_requests_total HTTP requests answered, by route, method and status.",
                     "# TYPE clipforge_http_requests_total counter"]
            for (route, method, status), count in sorted(self.requests.items()):
                lines.append(f'clipforge_http_requests_total{{route="{_escape(route)}",method="{method}",'
                             f'status="{status}"}} {count}')
            errors: dict[str, int] = defaultdict(int)
            for (route, _, status), count in self.requests.items():
                if status >= 400:
                    errors[route] += count
            lines += ["# HELP clipforge_http_errors_total HTTP requests answered with a 4xx or 5xx status.",
                      "# TYPE clipforge_http_errors_total counter"]
            lines += [f'clipforge_http_errors_total{{route="{_escape(route)}"}} {count}'
                      for route, count in sorted(errors.items())]
            lines += ["# HELP clipforge_http_request_duration_seconds Time to answer a request.",
                      "# TYPE clipforge_http_request_duration_seconds histogram"]
            for route, histogram in sorted(self.latency.items()):
                lines += histogram.lines("clipforge_http_request_duration_seconds", f'route="{_escape(route)}"')
            for name, what, prefix in (("encoder", "Queries encoded per model call.", ""),
                                       ("knn", "Queries searched per FAISS call.", "knn:")):
                lines += [f"# HELP clipforge_{name}_batch_size {what}", f"# TYPE clipforge_{name}_batch_size histogram"]
                for kind, histogram in sorted(self.batches.items()):
                    if kind.startswith("knn:") == bool(prefix):
                        lines += histogram.lines(f"clipforge_{name}_batch_size", f'kind="{kind.removeprefix(prefix)}"')
        return "\n".join(lines) + "\n"

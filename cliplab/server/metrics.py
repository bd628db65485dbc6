"""Prometheus text exposition (format 0.0.4) for the server: request counts by route and status, a latency
histogram per route, and the model batch sizes. Small and dependency-free; thread-safe."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        out.append(f"{name}_sum{{{labels}}} {self.sum:.6f}")
        out.append(f"{name}_count{{{labels}}} {self.count}")
        return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.latency: dict[str, Histogram] = {}
        self.batches: dict[str, Histogram] = {}
        self.gauges: dict[str, float] = {}

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(route, method, status)] += 1
            if status >= 500:
                self.errors[route] += 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def observe_batch(self, kind: str, size: int) -> None:
        with self._lock:
            self.batches.setdefault(kind, Histogram(BATCH_BUCKETS)).observe(size)

    def set_gauge(self, name: str, value: float) -> None:
        with self._lock:
            self.gauges[name] = value

    def render(self) -> str:
        with self._lock:
            out = ["# HELP cliplab_requests_total HTTP requests by route, method and status.",
                   "# TYPE cliplab_requests_total counter"]
            for (route, method, status), n in sorted(self.requests.items()):
                out.append(f'cliplab_requests_total{{route="{_escape(route)}",method="{method}",status="{status}"}} {n}')
            out += ["# HELP cliplab_request_errors_total Requests answered with a 5xx status, by route.",
                    "# TYPE cliplab_request_errors_total counter"]
            for route, n in sorted(self.errors.items()):
                out.append(f'cliplab_request_errors_total{{route="{_escape(route)}"}} {n}')
            out += ["# HELP cliplab_request_duration_seconds Request latency by route.",
                    "# TYPE cliplab_request_duration_seconds histogram"]
            for route, h in sorted(self.latency.items()):
                out += h.lines("cliplab_request_duration_seconds", f'route="{_escape(route)}"')
            out += ["# HELP cliplab_batch_size Items per model call, by kind (text, image).",
                    "# TYPE cliplab_batch_size histogram"]
            for kind, h in sorted(self.batches.items()):
                out += h.lines("cliplab_batch_size", f'kind="{kind}"')
            for name, value in sorted(self.gauges.items()):
                out += [f"# TYPE {name} gauge", f"{name} {value:g}"]
            return "\n".join(out) + "\n"

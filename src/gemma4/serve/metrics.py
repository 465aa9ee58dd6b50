"""Server metrics in the Prometheus text format (no client library: counters, gauges, histograms)."""

from __future__ import annotations

import math
import threading

__all__ = ["Metrics", "Histogram"]

# Seconds. TTFT spans prefill of long prompts; per-token latency is one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {acc}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{name}_sum {self.sum:.6f}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """Counters and histograms updated from the event loop and the engine thread (hence the lock)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, status) -> count
        self.finish: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.token_latency = Histogram(TOKEN_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1

    def finished(self, reason: str, prompt_tokens: int, generated: int, e2e: float | None) -> None:
        with self._lock:
            self.finish[reason] = self.finish.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.generation_tokens += generated
            if e2e is not None and math.isfinite(e2e):
                self.e2e.observe(e2e)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        with self._lock:
            self.token_latency.observe(seconds)

    def render(self, engine) -> str:
        """The exposition text; ``engine`` supplies the live gauges."""
        p = "gemma4"
        with self._lock:
            out = [f"# HELP {p}_requests_total HTTP requests by endpoint and status.",
                   f"# TYPE {p}_requests_total counter"]
            for (ep, st), n in sorted(self.requests.items()):
                out.append(f'{p}_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            out += [f"# HELP {p}_request_finish_total Generations by finish reason.",
                    f"# TYPE {p}_request_finish_total counter"]
            for r, n in sorted(self.finish.items()):
                out.append(f'{p}_request_finish_total{{reason="{r}"}} {n}')
            out += [f"# HELP {p}_prompt_tokens_total Prompt tokens of finished generations.",
                    f"# TYPE {p}_prompt_tokens_total counter", f"{p}_prompt_tokens_total {self.prompt_tokens}",
                    f"# HELP {p}_generation_tokens_total Generated tokens of finished generations.",
                    f"# TYPE {p}_generation_tokens_total counter",
                    f"{p}_generation_tokens_total {self.generation_tokens}"]
            out += [f"# HELP {p}_queue_depth Requests waiting for a batch row.", f"# TYPE {p}_queue_depth gauge",
                    f"{p}_queue_depth {engine.queue_depth}",
                    f"# HELP {p}_running_requests Requests holding a batch row.", f"# TYPE {p}_running_requests gauge",
                    f"{p}_running_requests {engine.active}",
                    f"# HELP {p}_kv_cache_bytes Bytes held by the batch KV cache.", f"# TYPE {p}_kv_cache_bytes gauge",
                    f"{p}_kv_cache_bytes {engine.cache.nbytes()}"]
            for name, h, text in ((f"{p}_time_to_first_token_seconds", self.ttft, "Time from submission to the first token."),
                                  (f"{p}_time_per_output_token_seconds", self.token_latency, "Time between consecutive tokens of a request."),
                                  (f"{p}_request_duration_seconds", self.e2e, "Time from submission to the last token.")):
                out += [f"# HELP {name} {text}", f"# TYPE {name} histogram"] + h.lines(name)
        return "\n".join(out) + "\n"

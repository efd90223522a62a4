"""The server's counters, exposed in Prometheus' text format at ``/metrics``.

Written by the scheduler thread and the request handlers, read by ``/metrics``: every
update and the rendering take one lock, so a scrape sees one consistent moment.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Tuple

__all__ = ["Metrics"]

# Time-to-first-token buckets, in seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PREFIX = "cyllama"


class Metrics:
    """Counters, gauges and a histogram; ``render()`` gives the exposition text."""

    def __init__(self, slots: int) -> None:
        self._lock = threading.Lock()
        self.slots = slots
        self.requests: Dict[Tuple[str, str], int] = {}  # (endpoint, outcome) -> count
        self.prompt_tokens = 0  # tokens of admitted prompts
        self.prompt_tokens_cached = 0  # of those, found in a slot's cells (prefix affinity)
        self.prompt_tokens_decoded = 0  # prompt tokens the engine has decoded so far
        self.generated_tokens = 0
        self.cancels = 0
        self.steps = 0
        self.slots_busy = 0
        self.queue_depth = 0
        self._ttft_counts = [0] * len(TTFT_BUCKETS)
        self._ttft_sum = 0.0
        self._ttft_count = 0

    def request(self, endpoint: str, outcome: str) -> None:
        with self._lock:
            key = (endpoint, outcome)
            self.requests[key] = self.requests.get(key, 0) + 1

    def add(self, **deltas: int) -> None:
        """Add to counters by name (``generated_tokens=3``)."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def set(self, **values: int) -> None:
        with self._lock:
            for name, value in values.items():
                setattr(self, name, value)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            for index, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self._ttft_counts[index] += 1
            self._ttft_sum += seconds
            self._ttft_count += 1

    def render(self) -> str:
        with self._lock:
            lines: List[str] = []

            def metric(name: str, kind: str, help_text: str, samples: List[Tuple[str, float]]) -> None:
                lines.append(f"# HELP {PREFIX}_{name} {help_text}")
                lines.append(f"# TYPE {PREFIX}_{name} {kind}")
                for labels, value in samples:
                    lines.append(f"{PREFIX}_{name}{labels} {value:g}" if isinstance(value, float)
                                 else f"{PREFIX}_{name}{labels} {value}")

            metric("requests_total", "counter", "Requests answered, by endpoint and outcome.",
                   [(f'{{endpoint="{e}",outcome="{o}"}}', n) for (e, o), n in sorted(self.requests.items())])
            metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", [("", self.prompt_tokens)])
            metric("prompt_tokens_cached_total", "counter",
                   "Prompt tokens found in a slot's cache (prefix affinity), not decoded again.",
                   [("", self.prompt_tokens_cached)])
            metric("prompt_tokens_decoded_total", "counter", "Prompt tokens decoded so far.",
                   [("", self.prompt_tokens_decoded)])
            metric("generated_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
            metric("cancels_total", "counter", "Requests whose work was cut short (client gone, shutdown).",
                   [("", self.cancels)])
            metric("steps_total", "counter", "Engine steps (one llama_decode each).", [("", self.steps)])
            metric("slots", "gauge", "Sequences of the engine's context.", [("", self.slots)])
            metric("slots_busy", "gauge", "Sequences running a request.", [("", self.slots_busy)])
            metric("queue_depth", "gauge", "Requests waiting for a slot.", [("", self.queue_depth)])
            name = f"{PREFIX}_time_to_first_token_seconds"
            lines.append(f"# HELP {name} Seconds from a request's arrival at the scheduler to its first token.")
            lines.append(f"# TYPE {name} histogram")
            for bound, count in zip(TTFT_BUCKETS, self._ttft_counts):
                lines.append(f'{name}_bucket{{le="{bound:g}"}} {count}')
            lines.append(f'{name}_bucket{{le="+Inf"}} {self._ttft_count}')
            lines.append(f"{name}_sum {self._ttft_sum:.6f}")
            lines.append(f"{name}_count {self._ttft_count}")
            return "\n".join(lines) + "\n"

"""Prometheus metrics of one server: requests, latency, time to first token, inter-token latency, generated
tokens and tokens/s, errors, queue depth.

Scraped at `GET /metrics` (bearer key required like every route but /health). Each app owns its own
registry, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds; CPU generation of a few hundred tokens can take tens of seconds, so the buckets reach 120 s.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# One decode step: milliseconds on a GPU, up to a second or so for a big batch on a busy CPU.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gemcut_requests", "Requests answered, by model, endpoint and status.", ["model", "endpoint", "status"], registry=r)
        self.latency = Histogram("gemcut_request_latency_seconds", "Time from arrival to the last byte.", ["model", "endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("gemcut_queue_wait_seconds", "Time a request waited for the model worker.", ["model"],
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("gemcut_time_to_first_token_seconds", "Time from a completion request's arrival at the "
                                             "worker to its first token.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("gemcut_inter_token_latency_seconds", "Time between two tokens of one sequence.", ["model"],
                                             buckets=STEP_BUCKETS, registry=r)
        self.generated_tokens = Counter("gemcut_generated_tokens", "Completion tokens generated (rate() of this is tokens/s).", ["model"], registry=r)
        self.prompt_tokens = Counter("gemcut_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.tokens_per_second = Gauge("gemcut_generation_tokens_per_second", "Tokens per second of the last decode step (sequences / step time).", ["model"], registry=r)
        self.batch_size = Histogram("gemcut_batch_size", "Sequences per decode step (classifiers, embeddings: rows per forward pass).", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.errors = Counter("gemcut_errors", "Error answers, by HTTP status and OpenAI error type.", ["status", "type"], registry=r)
        self.queue_depth = Gauge("gemcut_queue_depth", "Requests waiting for the model worker.", registry=r)

    def record_error(self, status: int, kind: str) -> None:
        self.errors.labels(status=str(status), type=kind).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

"""Prometheus metrics of one gateway instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pairloop_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pairloop_request_seconds",
            "Time to the complete answer (streams: to the last byte), by route.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.tokens = Counter(
            "pairloop_tokens",
            "Tokens processed, by kind (prompt, completion).",
            ["kind"],
            registry=self.registry,
        )
        self.errors = Counter(
            "pairloop_errors", "Error answers, by OpenAI error type.", ["type"], registry=self.registry
        )
        self.identical_pairs = Counter(
            "pairloop_identical_pairs", "Served pairs whose two texts were identical.", registry=self.registry
        )
        self.completions = Counter(
            "pairloop_completions_recorded", "Completions recorded for feedback.", registry=self.registry
        )
        self.backends_healthy = Gauge(
            "pairloop_backends_healthy",
            "vLLM backends that answered their last probe.",
            registry=self.registry,
        )

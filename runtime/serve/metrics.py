"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("toolkit_requests", "Generate requests answered, by HTTP status.", ["status"],
                                registry=self.registry)
        self.latency = Histogram("toolkit_request_latency_seconds", "Generate request latency, queueing included.",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("toolkit_batch_size_images", "Images per pipeline call.",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.images = Counter("toolkit_images", "Images generated.", registry=self.registry)
        self.errors = Counter("toolkit_errors", "Generate requests that failed, by kind.", ["kind"],
                              registry=self.registry)
        depth = Gauge("toolkit_queue_depth", "Requests waiting for a batch.", registry=self.registry)
        depth.set_function(queue_depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)

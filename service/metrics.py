"""Every Prometheus metric segserve exports, defined once (``segserve_`` prefix, base units).

The engine, the batcher and the HTTP layer import the objects they update from here; ``/metrics``
renders the default registry, which also carries the process and platform collectors.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
WINDOW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "segserve_requests_total",
    "HTTP requests by model, endpoint and status",
    ["model", "endpoint", "status"],
)
REQUEST_LATENCY = Histogram(
    "segserve_request_duration_seconds",
    "Whole HTTP request latency",
    ["model", "endpoint"],
    buckets=LATENCY_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "segserve_stage_duration_seconds",
    "Per-stage latency: decode, preprocess, queue_wait, inference, postprocess, encode",
    ["model", "stage"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "segserve_batch_size", "Inputs per onnxruntime run", ["model"], buckets=BATCH_BUCKETS
)
RUNS_BESIDE = Counter(
    "segserve_runs_beside_total",
    "onnxruntime runs beside others on a share of the CPU threads (parallel_runs); "
    "segserve_batch_size_count counts every run",
    ["model"],
)
INFLIGHT_BYTES = Gauge(
    "segserve_inflight_bytes",
    "Bytes requests in progress hold against SEGSERVE_MAX_INFLIGHT_BYTES: bodies, decoded "
    "images, plans' estimates, answers not yet taken by their clients",
)
QUEUE_DEPTH = Gauge("segserve_queue_depth", "Inputs waiting in the batch queue", ["model"])
QUEUE_WAIT = Histogram(
    "segserve_queue_wait_seconds",
    "Time an input waited in the queue before its batch ran",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
REJECTED = Counter(
    "segserve_rejected_total",
    "Requests refused with 503 and Retry-After, by reason: queue_full, memory (the in-flight "
    "byte budget), connections (requests in progress), draining, not_ready (models loading or "
    "failed), stopped",
    ["model", "reason"],
)
WINDOWS_PER_REQUEST = Histogram(
    "segserve_windows_per_request",
    "Model inputs (windows x scales x flips) per request",
    ["model"],
    buckets=WINDOW_BUCKETS,
)
IMAGES = Counter("segserve_images_total", "Images segmented", ["model"])
PIXELS = Counter("segserve_pixels_total", "Input pixels segmented", ["model"])
MODEL_LOADED = Gauge(
    "segserve_model_loaded", "1 when the model is loaded and warmed", ["model", "provider"]
)

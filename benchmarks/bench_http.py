"""The whole HTTP path against the bare forward of its own model file and HF's pipeline.

One random-init SegFormer-B0 (ADE20K head, 150 classes) is built from a ``SegformerConfig`` and
saved locally (nothing is downloaded); the same weights are exported to a segserve bundle. Then,
on the same 512x512 photograph (scikit-image's astronaut):

- the bare forward: the bundle's ``model.onnx`` in a ``service.runtime.Runtime`` made as the
  server makes it, fed the preprocessed tensor (no decode, resize, merge, encode or HTTP);
- the same ``model.onnx`` in a plain ``onnxruntime.InferenceSession`` (default options, spinning
  off as in the server), as a user would run the file: the runtime's aligned twin and session
  options are what differ;
- segserve through a real ``python -m service`` process (whole mode, JSON answer, multipart);
- HF ``pipeline("image-segmentation")`` in this process.

The sequential rows of the two forwards and HTTP come from calls alternating two at a time, so a
slow spell of a shared machine hits them alike; HTTP is also timed at concurrency 4 (four
threads). The pipeline runs last, in this process, sequentially and at concurrency 4: its
PyTorch threads would slow the forwards if its calls alternated with theirs.

    .venv/bin/python -m benchmarks.bench_http [--requests 40] [--work DIR] [--precision int8]
        [--spinning] [--weights region-like] [--no-aligned-twin]

``--weights region-like`` refits the classifier (both systems run the refitted weights) so the
photo gets region-like masks, as from a trained model, instead of random init's every class
competing at every pixel: segserve's label step costs less on such logits, the pipeline's not.

Prints median / p95 latency and throughput per row, then the ratios the targets name: HTTP median
over the bare forward's (the HTTP path's own cost) and over the plain session's (against running
the file yourself), segserve over the pipeline's throughput, segserve at concurrency 4 over the
bare single-stream throughput; and where the sequential requests' time went (their median
``Server-Timing`` stages, and what the client saw beyond the server's ``total``).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from PIL import Image
from skimage import data

from tests.servers import SegserveServer

if TYPE_CHECKING:
    from service.bundle import Bundle

NUM_CLASSES = 150
CONCURRENCY = 4
CHUNK = 2  # sequential calls per system in turn
BARE = "bare forward (model.onnx, segserve's runtime)"
PLAIN = "model.onnx, plain onnxruntime session"
HTTP = "segserve (HTTP, onnxruntime)"
PIPELINE = "HF pipeline (PyTorch)"


@dataclass(frozen=True)
class Row:
    system: str
    concurrency: int
    latencies_s: list[float]
    wall_s: float

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.wall_s

    def line(self) -> str:
        ordered = sorted(self.latencies_s)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        return (
            f"| {self.system} | {self.concurrency} | {statistics.median(ordered) * 1000:.0f} | "
            f"{p95 * 1000:.0f} | {self.throughput:.2f} |"
        )


def timed_run(
    call: Callable[[], None], requests: int, concurrency: int
) -> tuple[list[float], float]:
    """Run ``call`` ``requests`` times on ``concurrency`` threads; per-call latencies and wall."""

    def one(_: int) -> float:
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(requests)))
    return latencies, time.perf_counter() - started


def alternate(calls: dict[str, Callable[[], None]], requests: int) -> dict[str, Row]:
    """Sequential rows for several systems, their calls alternating ``CHUNK`` at a time: this
    VM slows down by a third for seconds at a time, and a slow spell must hit every row alike."""
    latencies: dict[str, list[float]] = {name: [] for name in calls}
    walls = dict.fromkeys(calls, 0.0)
    for start in range(0, requests, CHUNK):
        for name, call in calls.items():
            chunk_latencies, wall = timed_run(call, min(CHUNK, requests - start), 1)
            latencies[name] += chunk_latencies
            walls[name] += wall
    return {name: Row(name, 1, latencies[name], walls[name]) for name in calls}


def build_models(work: Path, precision: str, weights: str) -> tuple[Path, Path]:
    """HF SegFormer-B0 (random init, or with its classifier refitted to regions) saved to
    ``work/hf[-WEIGHTS]``, exported at ``precision`` to ``work/repo[-WEIGHTS][-PRECISION]/
    segformer-b0`` (the pipeline always runs the fp32 weights)."""
    import torch
    from transformers import (
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessorPil,
    )

    suffix = "" if weights == "random" else f"-{weights}"
    hf_dir = work / f"hf{suffix}"
    repository = work / f"repo{suffix}{'' if precision == 'fp32' else f'-{precision}'}"
    if not (hf_dir / "config.json").is_file():
        torch.manual_seed(0)
        config = SegformerConfig(
            num_labels=NUM_CLASSES,
            id2label={i: f"class{i}" for i in range(NUM_CLASSES)},
            label2id={f"class{i}": i for i in range(NUM_CLASSES)},
        )
        model = SegformerForSemanticSegmentation(config).eval()
        processor = SegformerImageProcessorPil(size={"height": 512, "width": 512})
        if weights == "region-like":
            refit_to_regions(model, processor)
        model.save_pretrained(hf_dir)
        processor.save_pretrained(hf_dir)
    bundle = repository / "segformer-b0"
    if not (bundle / "segserve.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "export", "--model", "segformer-b0", "--checkpoint", str(hf_dir),
             "--dataset", "ade20k", "--out", str(bundle), "--verify-size", "512x512",
             "--precision", precision],
            check=True,
        )  # fmt: skip
    return hf_dir, repository


REGION_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def refit_to_regions(model: Any, processor: Any) -> None:
    """Refit the HF model's 1x1 classifier so that it labels superpixels of the photos (the
    benchmark's among them): region-like masks with a few dozen classes, as a trained model
    gives, where random weights leave every class competing at every pixel (which only costs
    segserve's pruned label step, not the pipeline's). For speed figures only."""
    import torch

    from export.quantize import fit_region_classifier, photos, superpixel_classes

    found: list[np.ndarray] = []
    classifier = model.decode_head.classifier
    hook = classifier.register_forward_hook(lambda _m, args, _o: found.append(args[0].numpy()))
    batches = photos(REGION_PHOTOS)
    with torch.no_grad():
        for batch in batches:
            model(**processor(images=batch[0].transpose(1, 2, 0), return_tensors="pt"))
    hook.remove()
    targets = [superpixel_classes(batch, NUM_CLASSES, seed) for seed, batch in enumerate(batches)]
    stride = batches[0].shape[2] // found[0].shape[2]
    weight, bias = fit_region_classifier(found, targets, NUM_CLASSES, stride)
    classifier.weight.data = torch.from_numpy(weight).reshape(classifier.weight.shape)
    classifier.bias.data = torch.from_numpy(bias)


def model_input(bundle: Bundle, photo: bytes) -> np.ndarray:
    """The photo as the bundle's model takes it, a batch of one (what the server feeds it)."""
    from service.engine import Engine
    from service.imageio import decode_image

    return Engine(bundle)._to_input(decode_image(photo, 10**8))[None]


def bare_forward(
    bundle: Bundle, tensor: np.ndarray, spinning: bool = False, aligned_twin: bool = True
) -> Callable[[], None]:
    """One forward of the bundle's model on ``tensor``, in a runtime made as the server makes
    it (same session options, all cores, the aligned twin for the 512x512 input)."""
    from service.config import RuntimeSettings
    from service.runtime import Runtime

    meta = bundle.metadata
    runtime = Runtime(
        bundle.model_path,
        meta.input.name,
        meta.output.name,
        meta.input.dtype,
        RuntimeSettings(
            providers=("cpu",),
            intra_op_spinning=spinning,
            parallel_runs=1,
            **({} if aligned_twin else {"aligned_twin_max_mib": 0}),
        ),
        aligned_side=meta.aligned_side,
    )

    def forward() -> None:
        runtime.run(tensor)

    return forward


def plain_session(bundle: Bundle, tensor: np.ndarray) -> Callable[[], None]:
    """One forward of the bundle's ``model.onnx`` on ``tensor`` in an ``InferenceSession`` with
    default options but spinning off (its threads would spin into the calls alternating with
    it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        str(bundle.model_path), options, providers=["CPUExecutionProvider"]
    )
    feed = {bundle.metadata.input.name: tensor}

    def forward() -> None:
        session.run(None, feed)

    return forward


def bench_pipeline(hf_dir: Path, photo: bytes, requests: int) -> list[Row]:
    """HF ``pipeline("image-segmentation")`` on the photo, sequential then at concurrency 4, in
    this process once the segserve rows are done (PyTorch's threads would slow the forwards
    if its calls alternated with theirs)."""
    from transformers import pipeline

    segmenter = pipeline("image-segmentation", model=str(hf_dir), device="cpu")
    image = Image.open(io.BytesIO(photo)).convert("RGB")

    def call() -> None:
        segments = segmenter(image)
        assert segments and np.asarray(segments[0]["mask"]).shape == (512, 512)

    for _ in range(2):
        call()
    return [Row(PIPELINE, c, *timed_run(call, requests, c)) for c in (1, CONCURRENCY)]


def bench(
    repository: Path,
    work: Path,
    photo: bytes,
    requests: int,
    server_settings: dict[str, Any],
    aligned_twin: bool,
) -> tuple[list[Row], dict[str, float]]:
    """The sequential rows of the plain session, the bare forward and HTTP from alternating
    calls, then HTTP at concurrency 4; and the sequential requests' median ``Server-Timing``
    stages in ms, with ``client`` the whole call's median as the client saw it."""
    from service.bundle import load_bundle

    server = SegserveServer(
        repository,
        work / "server.log",
        intra_op_threads=0,
        worker_threads=2,
        **server_settings,
        **({} if aligned_twin else {"aligned_twin_max_mib": 0}),
    )
    try:
        server.wait_ready(timeout_s=300)
        spinning = server_settings["intra_op_spinning"]
        bundle = load_bundle(repository / "segformer-b0")
        tensor = model_input(bundle, photo)
        calls = {
            PLAIN: plain_session(bundle, tensor),
            BARE: bare_forward(bundle, tensor, spinning, aligned_twin),
        }
        stages: dict[str, list[float]] = {}
        with httpx.Client(base_url=server.url, timeout=120) as client:

            def post() -> None:
                response = client.post("/segment", files={"image": ("astronaut.jpg", photo)})
                response.raise_for_status()
                assert response.json()["width"] == 512
                for stage, ms in server_timing(response.headers["server-timing"]).items():
                    stages.setdefault(stage, []).append(ms)

            calls[HTTP] = post
            for call in calls.values():  # warm-up
                for _ in range(3):
                    call()
            stages.clear()
            rows = alternate(calls, requests)
            sequential = {stage: statistics.median(ms) for stage, ms in stages.items()}
            sequential["client"] = 1000 * median(rows[HTTP])
            concurrent = Row(HTTP, CONCURRENCY, *timed_run(post, requests, CONCURRENCY))
            return [*rows.values(), concurrent], sequential
    finally:
        server.terminate()


def server_timing(header: str) -> dict[str, float]:
    """``{stage: ms}`` from a ``Server-Timing`` header (``name;dur=ms, ...``)."""
    timings = {}
    for entry in header.split(","):
        name, _, duration = entry.strip().partition(";dur=")
        timings[name] = float(duration)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=40, help="requests per row")
    parser.add_argument("--work", type=Path, help="keep models here (default: a temp dir)")
    parser.add_argument(
        "--batch", type=int, default=1, help="SEGSERVE_MAX_BATCH_SIZE (1: CPU pipelines better)"
    )
    parser.add_argument("--skip-pipeline", action="store_true", help="segserve rows only")
    parser.add_argument(
        "--spinning", action="store_true", help="SEGSERVE_INTRA_OP_SPINNING (bare forward too)"
    )
    parser.add_argument(
        "--parallel-runs", type=int, default=2, help="SEGSERVE_PARALLEL_RUNS (1: one at a time)"
    )
    parser.add_argument(
        "--no-aligned-twin",
        action="store_true",
        help="SEGSERVE_ALIGNED_TWIN_MAX_MIB=0 (bare forward too): the graph's own Resizes",
    )
    parser.add_argument(
        "--precision", choices=("fp32", "int8"), default="fp32", help="the bundle segserve serves"
    )
    parser.add_argument(
        "--weights",
        choices=("random", "region-like"),
        default="random",
        help="the model's weights: random init, or its classifier refitted to photos' regions",
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="segserve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, repository = build_models(work, args.precision, args.weights)

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="JPEG", quality=90)
    photo = buffer.getvalue()

    rows, stages = bench(
        repository,
        work,
        photo,
        args.requests,
        {
            "max_batch_size": args.batch,
            "intra_op_spinning": args.spinning,
            "parallel_runs": args.parallel_runs,
        },
        not args.no_aligned_twin,
    )
    if not args.skip_pipeline:
        rows += bench_pipeline(hf_dir, photo, args.requests)
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_description()}), {platform.platform()}"
    )
    print(f"\nmachine: {machine}; {args.requests} requests per row, 512x512 JPEG, SegFormer-B0, "
          f"{args.weights} weights, {args.precision} bundle, SEGSERVE_MAX_BATCH_SIZE={args.batch}, "
          f"SEGSERVE_INTRA_OP_SPINNING={int(args.spinning)}, "
          f"SEGSERVE_PARALLEL_RUNS={args.parallel_runs}, "
          f"aligned twin {'off' if args.no_aligned_twin else 'on'}; sequential rows alternating "
          f"{CHUNK} calls at a time")  # fmt: skip
    print("| system | concurrency | median ms | p95 ms | images/s |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(row.line())
    by_key = {(row.system, row.concurrency): row for row in rows}
    bare, plain, http = by_key[BARE, 1], by_key[PLAIN, 1], by_key[HTTP, 1]
    print(
        f"HTTP / bare forward, sequential median: {median(http) / median(bare):.2f}x; "
        f"HTTP / plain session: {median(http) / median(plain):.2f}x; "
        f"HTTP at concurrency {CONCURRENCY} / bare single-stream throughput: "
        f"{by_key[HTTP, CONCURRENCY].throughput / bare.throughput:.2f}x"
    )
    client_beyond = stages["client"] - stages["total"]
    print(
        "sequential HTTP, median Server-Timing ms: "
        + ", ".join(f"{stage} {ms:.2f}" for stage, ms in stages.items() if stage != "client")
        + f"; the client saw {client_beyond:.2f} more than total"
    )
    for concurrency in (1, CONCURRENCY):
        if (PIPELINE, concurrency) in by_key:
            ratio = by_key[HTTP, concurrency].throughput / by_key[PIPELINE, concurrency].throughput
            print(f"segserve / HF pipeline throughput at concurrency {concurrency}: {ratio:.2f}x")


VECTOR_EXTENSIONS = (("avx512_vnni", "AVX-512 VNNI"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def cpu_description() -> str:
    """The CPU's model and widest vector extension: VMs of one name differ (an AVX2 EPYC runs
    the forward 1.3x and the label step 2x slower than an AVX-512 one), so figures say which."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in cpuinfo.splitlines())
    )
    flags = set(fields.get("flags", "").split())
    widest = next((name for flag, name in VECTOR_EXTENSIONS if flag in flags), "no AVX2")
    return f"{fields.get('model name', 'unknown CPU')}, {widest}"


def median(row: Row) -> float:
    return statistics.median(row.latencies_s)


if __name__ == "__main__":
    main()

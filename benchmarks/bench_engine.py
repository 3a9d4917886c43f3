"""Engine speed on real photographs, against PyTorch eager in the same process.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_engine.py [--models segformer-b0 segformer-b2]
        [--batch-sizes 1 2 4 8 16] [--repository DIR] [--repeats 3]

For each model (random-init bundles exported with ``export.export_bundle`` unless a repository
holding them is given; speed does not depend on the weights) it prints:

1. latency (median, p95) of ``Engine.segment`` per mode on four scikit-image photographs:
   whole (ADE20K test scale), slide (512x512 crops, 341 stride) and multi-scale + flip;
2. throughput (images/s) at each batch size for 512x512 images: the engine (``2 x batch``
   concurrent requests, ``max_batch_size = batch``) against PyTorch eager running the same work
   (normalise, forward, bilinear resize to 512x512, argmax) with our ``models/`` SegFormer and
   HuggingFace ``transformers``' ``SegformerForSemanticSegmentation``, and the ratios; best of
   ``--repeats`` interleaved rounds;
3. slide overhead on a 2048x1024 image: engine latency / sum of its window forwards run alone,
   for the random-init weights and for the same network with its classifier refitted (least
   squares on its own decoder features) to superpixels of that image. Labels-only slide
   requests skip classes that cannot win a tile (``service.labelmap``), so this step's cost
   depends on the weights: random ones make every class compete everywhere (a worst case),
   the refitted ones give region-like masks as a trained model does;
4. ``postprocess``: engine against PyTorch eager (``models/``, same precision, same device) in
   images/s at each batch size, for whole mode on 512x512 images (ADE20K bundle) and slide mode
   on 2048x1024 images (Cityscapes bundle: 1024x1024 crops, stride 768, three windows each; eager
   runs mmseg's ``slide_inference`` with the windows of ``2 x batch`` images batched ``batch`` at
   a time), with post-processing on the host and on the device (``--postprocess``);
5. ``tta``: multi-pass requests (``service/ttamap.py``) against the same passes run one by one
   as single-pass label requests, with the peak RSS above idle, the share of output tiles the
   pruning leaves to exact arithmetic and the label step with and without pruning: three ratios
   + flip on a 2048x1024 photo (ADE20K bundle, random-init and refitted weights), the seed's set
   (six ratios + flip, slide, Cityscapes bundle refitted) and flip on a 12 MP photo.

PyTorch gets the same number of threads as onnxruntime's intra-op pool. ``--device cuda`` runs the
engine on onnxruntime's CUDA provider (no CPU fallback) and the eager baselines on the GPU;
``--precision fp16`` exports fp16 bundles and runs the eager baselines in half precision too;
``--cuda-graphs`` runs the engine with captured CUDA graphs (``service/cuda_graphs.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from skimage import data

from service import ttamap
from service.bundle import Bundle, load_bundle
from service.config import EngineConfig, RuntimeSettings
from service.engine import Engine
from service.geometry import resize_image
from service.planning import SegmentOptions
from service.runtime import default_intra_op_threads

PHOTOS = {
    "astronaut": data.astronaut,
    "chelsea": data.chelsea,
    "coffee": data.coffee,
    "rocket": data.rocket,
}
SECTIONS = ("latency", "throughput", "slide", "postprocess", "tta")
MODES = {
    "whole": SegmentOptions(),
    "slide": SegmentOptions(mode="slide", crop=(512, 512), stride=(341, 341)),
    "ms+flip": SegmentOptions(scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True),
}
# transformers SegformerConfig fields per variant (the MiT-B0/B2 tables of the paper).
HF_CONFIGS = {
    "segformer-b0": dict(
        hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256
    ),
    "segformer-b2": dict(
        hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768
    ),
}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


@dataclass(frozen=True)
class Target:
    """Where both contenders run: the engine's provider and the eager baselines' device."""

    device: str  # "cpu" or "cuda"
    precision: Literal["fp32", "fp16"]
    cuda_graphs: bool = False  # the engine's RuntimeSettings.cuda_graphs

    def engine_config(
        self,
        max_batch_size: int,
        max_queue_delay_ms: float = EngineConfig.max_queue_delay_ms,
        postprocess: Literal["auto", "host", "device"] = EngineConfig.postprocess,
    ) -> EngineConfig:
        return EngineConfig(
            max_batch_size=max_batch_size,
            max_queue_delay_ms=max_queue_delay_ms,
            inference_timeout_s=3600.0,  # 2 x batch requests queue behind each other here
            postprocess=postprocess,
            runtime=RuntimeSettings(
                providers=(self.device,), allow_cpu_fallback=False, cuda_graphs=self.cuda_graphs
            ),
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float16 if self.precision == "fp16" else torch.float32

    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def bundle_for(
    model: str, repository: Path | None, scratch: Path, target: Target, dataset: str = "ade20k"
) -> Bundle:
    """``repository/<model>`` (ADE20K) or ``repository/<model>-<dataset>`` when there, else a
    random-init export of it in ``target``'s precision."""
    name = model if dataset == "ade20k" else f"{model}-{dataset}"
    if repository is not None and (repository / name).is_dir():
        return load_bundle(repository / name)
    from export import export_bundle

    out = scratch / name
    print(f"exporting {model} (random init, {dataset}, {target.precision}) ...", flush=True)
    export_bundle(
        model,
        out,
        random_init=True,
        dataset=dataset,
        precision=target.precision,
        skip_verify=True,
    )
    return load_bundle(out)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def latency_table(engine: Engine, photos: dict[str, np.ndarray], repeats: int) -> list[str]:
    rows = []
    for mode, options in MODES.items():
        # Multi-scale + flip costs ~12 forwards per image: one run on two photos.
        runs, images = (
            (1, list(photos.values())[:2]) if mode == "ms+flip" else (repeats, photos.values())
        )
        asyncio.run(engine.segment(photos["chelsea"], options))  # warm this mode's shapes
        samples = [
            timed(lambda image=image, options=options: asyncio.run(engine.segment(image, options)))
            for image in images
            for _ in range(runs)
        ]
        inputs = asyncio.run(engine.segment(photos["astronaut"], options)).num_inputs
        rows.append(
            f"| {engine.name} | {mode} | {len(samples)} | {inputs} | "
            f"{statistics.median(samples) * 1000:.0f} | {percentile(samples, 95) * 1000:.0f} |"
        )
    return rows


def engine_burst(engine: Engine, images: list[np.ndarray], batch: int) -> Callable[[], float]:
    """A measurement: ``2 x batch`` concurrent 512x512 requests, returns images/s."""
    work = [images[i % len(images)] for i in range(2 * batch)]

    async def burst(chunk: list[np.ndarray]) -> None:
        await asyncio.gather(*(engine.segment(image, SegmentOptions()) for image in chunk))

    asyncio.run(burst(work[:batch]))  # warm-up: one batch of this size
    return lambda: len(work) / timed(lambda: asyncio.run(burst(work)))


def eager_burst(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: list[np.ndarray],
    batch: int,
    target: Target,
) -> Callable[[], float]:
    """The same work in PyTorch eager: upload, normalise, forward, resize to the input, argmax,
    labels back to the host (as the engine returns them)."""
    mean = torch.tensor([123.675, 116.28, 103.53], device=target.device).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375], device=target.device).view(1, 3, 1, 1)
    work = [images[i % len(images)] for i in range(2 * batch)]

    @torch.inference_mode()
    def run_all(chunk_of_work: list[np.ndarray]) -> None:
        for start in range(0, len(chunk_of_work), batch):
            chunk = np.stack(chunk_of_work[start : start + batch]).transpose(0, 3, 1, 2)
            pixels = torch.from_numpy(chunk).to(target.device).float()
            pixels = ((pixels - mean) / std).to(target.torch_dtype)
            logits = forward(pixels)
            resized = F.interpolate(logits, size=pixels.shape[2:], mode="bilinear")
            resized.argmax(dim=1).to(torch.uint8).cpu().numpy()
        target.synchronize()

    run_all(work[:batch])  # warm-up: one batch of this size
    return lambda: len(work) / timed(lambda: run_all(work))


def eager_slide_burst(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: list[np.ndarray],
    batch: int,
    target: Target,
    crop: tuple[int, int],
    stride: tuple[int, int],
) -> Callable[[], float]:
    """mmseg's ``slide_inference`` in PyTorch eager on ``2 x batch`` images: their windows run
    ``batch`` at a time, each resized to its window and summed, divided by the count, argmax,
    labels back to the host. Returns images/s."""
    mean = torch.tensor([123.675, 116.28, 103.53], device=target.device).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375], device=target.device).view(1, 3, 1, 1)
    work = [images[i % len(images)] for i in range(2 * batch)]
    height, width = work[0].shape[:2]
    windows = [
        (y1, x1)
        for y1 in sorted({min(r * stride[0], height - crop[0]) for r in range(height)})
        for x1 in sorted({min(c * stride[1], width - crop[1]) for c in range(width)})
    ]

    @torch.inference_mode()
    def run_all(chunk_of_work: list[np.ndarray]) -> None:
        pixels = torch.from_numpy(np.stack(chunk_of_work).transpose(0, 3, 1, 2))
        pixels = ((pixels.to(target.device).float() - mean) / std).to(target.torch_dtype)
        jobs = [(i, y1, x1) for i in range(len(chunk_of_work)) for y1, x1 in windows]
        sums: torch.Tensor | None = None
        counts = torch.zeros((1, 1, height, width), device=target.device)
        for y1, x1 in windows:
            counts[:, :, y1 : y1 + crop[0], x1 : x1 + crop[1]] += 1
        for start in range(0, len(jobs), batch):
            part = jobs[start : start + batch]
            crops = torch.stack(
                [pixels[i, :, y1 : y1 + crop[0], x1 : x1 + crop[1]] for i, y1, x1 in part]
            )
            logits = F.interpolate(forward(crops).float(), size=crop, mode="bilinear")
            if sums is None:
                sums = torch.zeros(
                    (len(chunk_of_work), logits.shape[1], height, width), device=target.device
                )
            for (i, y1, x1), window_logits in zip(part, logits, strict=True):
                sums[i, :, y1 : y1 + crop[0], x1 : x1 + crop[1]] += window_logits
        assert sums is not None
        (sums / counts).argmax(dim=1).to(torch.uint8).cpu().numpy()
        target.synchronize()

    run_all(work[:batch])  # warm-up
    return lambda: len(work) / timed(lambda: run_all(work))


def postprocess_rows(
    bundle: Bundle,
    forward: Callable[[torch.Tensor], torch.Tensor],
    mode: str,
    images: list[np.ndarray],
    batch: int,
    postprocess: list[str],
    rounds: int,
    target: Target,
) -> list[str]:
    """Engine (one per post-processing setting) and eager images/s, best of ``rounds``
    interleaved measurements: one row per setting."""
    test_config = bundle.metadata.test_config
    engines = {
        where: Engine(
            bundle,
            target.engine_config(batch, max_queue_delay_ms=20.0, postprocess=where),  # type: ignore[arg-type]
        )
        for where in postprocess
    }
    for engine in engines.values():
        engine.start()
    try:
        contenders = {where: engine_burst(e, images, batch) for where, e in engines.items()}
        if mode == "slide":
            assert test_config.crop is not None and test_config.stride is not None
            contenders["eager"] = eager_slide_burst(
                forward, images, batch, target, test_config.crop, test_config.stride
            )
        else:
            contenders["eager"] = eager_burst(forward, images, batch, target)
        best = dict.fromkeys(contenders, 0.0)
        for _ in range(rounds):
            for name, measure in contenders.items():
                best[name] = max(best[name], measure())
    finally:
        for engine in engines.values():
            engine.stop()
    height, width = images[0].shape[:2]
    eager = best.pop("eager")
    return [
        f"| {bundle.name} | {target.device} {target.precision} | {mode} {width}x{height} | "
        f"{batch} | {where}{' + CUDA graphs' if target.cuda_graphs else ''} | "
        f"{rate:.2f} | {eager:.2f} | {rate / eager:.2f}x |"
        for where, rate in best.items()
    ]


def throughput_row(
    model: str,
    bundle: Bundle,
    baselines: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    images: list[np.ndarray],
    batch: int,
    rounds: int,
    target: Target,
) -> str:
    """Best of ``rounds`` interleaved measurements each, so load from other processes on the
    shared machine hits all contenders alike."""
    engine = Engine(bundle, target.engine_config(max_batch_size=batch, max_queue_delay_ms=20.0))
    engine.start()
    try:
        contenders = {"engine": engine_burst(engine, images, batch)}
        contenders |= {
            name: eager_burst(fn, images, batch, target) for name, fn in baselines.items()
        }
        best = dict.fromkeys(contenders, 0.0)
        for _ in range(rounds):
            for name, measure in contenders.items():
                best[name] = max(best[name], measure())
    finally:
        engine.stop()
    ours = best.pop("engine")
    return (
        f"| {model} | {batch} | {ours:.2f} | "
        + " | ".join(f"{value:.2f}" for value in best.values())
        + " | "
        + " | ".join(f"{ours / value:.2f}x" for value in best.values())
        + " |"
    )


def torch_models(
    model: str, num_classes: int, target: Target
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from models.registry import create_model

    ours = create_model(model, num_classes=num_classes).eval()
    config = SegformerConfig(num_labels=num_classes, **HF_CONFIGS[model])
    hf = SegformerForSemanticSegmentation(config).eval()
    ours.to(target.device, target.torch_dtype)
    hf.to(target.device, target.torch_dtype)
    return {
        "models/ eager": lambda pixels: ours(pixels),
        "HF eager": lambda pixels: hf(pixel_values=pixels).logits,
    }


def slide_overhead(engine: Engine, image: np.ndarray, repeats: int, weights: str) -> str:
    options = MODES["slide"]
    plan = engine.plan(options, *image.shape[:2])
    pass_plan = plan.passes[0]
    scaled = resize_image(image, pass_plan.width, pass_plan.height)
    windows = [
        np.ascontiguousarray(scaled[w.y1 : w.y2, w.x1 : w.x2].transpose(2, 0, 1))[None]
        for w in pass_plan.windows
    ]
    runtime = engine._runtime  # the engine's own session, so both sides run the same graph
    assert runtime is not None
    asyncio.run(engine.segment(image, options))  # warm-up
    forwards, totals = [], []
    for _ in range(repeats):  # interleaved, medians (Runtime.run returns host logits: synced)
        forwards.append(sum(timed(lambda w=window: runtime.run(w)) for window in windows))
        totals.append(timed(lambda: asyncio.run(engine.segment(image, options))))
    forward, total = statistics.median(forwards), statistics.median(totals)
    return (
        f"| {engine.name} | {weights} | {engine.config.max_batch_size} | "
        f"{image.shape[1]}x{image.shape[0]} -> "
        f"{pass_plan.width}x{pass_plan.height} | {len(windows)} | {forward * 1000:.0f} | "
        f"{total * 1000:.0f} | {total / forward:.2f}x |"
    )


def memory_kib(field: str) -> int:
    """A field of /proc/self/status in KiB: VmRSS now, VmHWM the peak since the last reset."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


@dataclass
class LabelStep:
    """The last ``ttamap.mean_softmax`` call of the engine: its result and its seconds."""

    compute: Callable[..., ttamap.MeanSoftmax]
    result: ttamap.MeanSoftmax | None = None
    seconds: float = 0.0
    passes: list[ttamap.PassLogits] | None = None


def record_label_step() -> LabelStep:
    """Wrap ``ttamap.mean_softmax`` (which the engine looks up on the module) to keep its last
    result, time and inputs: the pruning figures need them, the engine does not report them."""
    step = LabelStep(ttamap.mean_softmax)

    def recording(passes: list[ttamap.PassLogits], *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        step.result = step.compute(passes, *args, **kwargs)
        step.seconds = time.perf_counter() - started
        step.passes = passes
        return step.result

    ttamap.mean_softmax = recording  # type: ignore[assignment]
    return step


def tta_row(
    engine: Engine,
    image: np.ndarray,
    options: SegmentOptions,
    repeats: int,
    label: str,
    step: LabelStep,
    dense: bool,
) -> str:
    """Engine time of a multi-pass request against the same passes run one by one as
    single-pass label requests (a flipped pass as the mirrored image), medians of interleaved
    runs; peak RSS above the RSS before the request (Linux VmHWM, reset before it); the share of
    output tiles the pruning left to the exact step, the label step's time, and with ``dense``
    that step without pruning (the probabilities path, which computes every class)."""
    ratios = [None] if options.scales is None else [(ratio,) for ratio in options.scales]
    mirrored = np.ascontiguousarray(image[:, ::-1])
    singles = [
        (mirrored if flip else image, replace(options, scales=ratio, flip=False))
        for ratio in ratios
        for flip in ((False, True) if options.flip else (False,))
    ]
    plan = engine.plan(options, *image.shape[:2])

    def request(one: np.ndarray, opts: SegmentOptions) -> object:
        return asyncio.run(engine.segment(one, opts))

    request(image, options)  # warm-up (and onnxruntime's arena for these shapes)
    together, apart, peak = [], [], 0
    for _ in range(repeats):
        idle = memory_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        together.append(timed(lambda: request(image, options)))
        peak = max(peak, memory_kib("VmHWM") - idle)
        apart.append(sum(timed(lambda one=one, o=o: request(one, o)) for one, o in singles))
    assert step.result is not None and step.passes is not None
    pruned = step.result
    unpruned = ""
    if dense:
        original = (image.shape[0], image.shape[1])
        dtype = pruned.labels.dtype.type
        unpruned = f"{timed(lambda: step.compute(step.passes, original, dtype, True)) * 1000:.0f}"
    together_s, apart_s = statistics.median(together), statistics.median(apart)
    return (
        f"| {engine.name} | {label} | {image.shape[1]}x{image.shape[0]} | {len(plan.passes)} | "
        f"{plan.num_inputs} | {apart_s * 1000:.0f} | {together_s * 1000:.0f} | "
        f"{together_s / apart_s:.2f}x | {peak / 1024:.0f} | "
        f"{pruned.exact_tiles / pruned.tiles:.1%} | {step.seconds * 1000:.0f} | {unpruned} |"
    )


def refitted_bundle(
    bundle: Bundle, image: np.ndarray, options: SegmentOptions, out: Path
) -> Bundle:
    """A copy of ``bundle`` whose final 1x1 classifier is refitted by ridge regression on the
    graph's own decoder features to SLIC superpixels of ``image`` (one random class each), so
    its slide masks have regions like a trained model's. Speed figures only: not a real model."""
    import onnx
    from skimage import segmentation

    from export.quantize import refit_classifier
    from service.config import Limits
    from service.planning import plan_request

    shutil.copytree(bundle.path, out)
    model_path = out / bundle.model_path.relative_to(bundle.path)
    pass_plan = plan_request(
        bundle.metadata,
        options,
        *image.shape[:2],
        Limits(max_pixels=1 << 30, max_inputs_per_request=1 << 20, max_request_bytes=1 << 40),
    ).passes[0]
    scaled = resize_image(image, pass_plan.width, pass_plan.height)
    regions = segmentation.slic(scaled, n_segments=40, compactness=20, start_label=0)
    classes = bundle.metadata.num_classes
    # One class per superpixel, all different while there are enough classes.
    picks = np.resize(np.random.default_rng(0).permutation(classes), regions.max() + 1)
    region_class = picks[regions]
    crops, targets = [], []
    for w in pass_plan.windows:
        crop = np.ascontiguousarray(scaled[w.y1 : w.y2, w.x1 : w.x2].transpose(2, 0, 1))[None]
        crops.append(crop.astype(bundle.metadata.input.dtype))
        targets.append(region_class[w.y1 : w.y2, w.x1 : w.x2])
    graph = onnx.load(str(model_path))
    stride = bundle.metadata.output.stride
    onnx.save(refit_classifier(graph, crops, targets, stride), str(model_path))
    return load_bundle(out)


SEED_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def tta_table(
    model: str,
    ade: Bundle,
    repository: Path | None,
    scratch: Path,
    target: Target,
    photo: np.ndarray,
    repeats: int,
) -> list[str]:
    """Multi-pass requests (``service.ttamap``): three ratios + flip on a 2048x1024 photo with
    the ADE20K bundle (random init and refitted weights), the seed set (six ratios + flip, slide
    mode) with the Cityscapes bundle refitted, and flip alone on a 12 MP photo."""
    wide = resize_image(photo, 2048, 1024)
    ade_refitted = refitted_bundle(ade, wide, MODES["slide"], scratch / f"{model}-refitted-tta")
    cityscapes = bundle_for(model, repository, scratch, target, "cityscapes")
    cityscapes_refitted = refitted_bundle(
        cityscapes, wide, SegmentOptions(), scratch / f"{model}-cityscapes-refitted"
    )
    three = SegmentOptions(scales=(0.75, 1.0, 1.25), flip=True)
    seed = SegmentOptions(mode="slide", scales=SEED_RATIOS, flip=True)
    flip = SegmentOptions(flip=True)
    cases = [
        (ade, "random init", wide, three, True),
        (ade_refitted, "refitted", wide, three, True),
        (cityscapes_refitted, "refitted", wide, seed, True),
        (ade_refitted, "refitted", resize_image(photo, 4000, 3000), flip, False),  # 12 MP
    ]
    step = record_label_step()
    rows = []
    for bundle, weights, image, options, dense in cases:
        engine = Engine(bundle, target.engine_config(EngineConfig.max_batch_size))
        engine.start()
        try:
            ratios = len(options.scales or (1,))
            label = f"{weights}, {ratios} ratio(s) + flip, {options.mode or 'whole'}"
            rows.append(tta_row(engine, image, options, repeats, label, step, dense))
            print(rows[-1], flush=True)
        finally:
            engine.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["segformer-b0", "segformer-b2"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument(
        "--postprocess",
        nargs="+",
        choices=("host", "device"),
        default=["host", "device"],
        help="post-processing settings the postprocess section compares",
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="engine with captured CUDA graphs"
    )
    args = parser.parse_args()
    if args.precision == "fp16" and args.device == "cpu":
        parser.error("fp16 is for --device cuda (PyTorch's CPU half precision is no baseline)")
    target = Target(args.device, args.precision, args.cuda_graphs)

    threads = default_intra_op_threads()
    torch.set_num_threads(threads)
    photos = {name: np.ascontiguousarray(load()) for name, load in PHOTOS.items()}
    squares = [resize_image(photo, 512, 512) for photo in photos.values()]
    wide = resize_image(photos["astronaut"], 2048, 1024)
    wides = [resize_image(photo, 2048, 1024) for photo in photos.values()]
    print(f"# cpu: {os.cpu_count()} cores visible, onnxruntime intra-op {threads}, torch {threads}")
    if target.device == "cuda":
        print(f"# gpu: {torch.cuda.get_device_name()}, {target.precision}")

    latency, throughput, overhead, postprocess, tta = [], [], [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for model in args.models:
            if "postprocess" in args.sections:
                for mode, dataset, images in (
                    ("whole", "ade20k", squares),
                    ("slide", "cityscapes", wides),
                ):
                    bundle = bundle_for(model, args.repository, Path(scratch), target, dataset)
                    eager = torch_models(model, bundle.metadata.num_classes, target)
                    for batch in args.batch_sizes:
                        rows = postprocess_rows(
                            bundle,
                            eager["models/ eager"],
                            mode,
                            images,
                            batch,
                            args.postprocess,
                            args.repeats,
                            target,
                        )
                        postprocess += rows
                        print("\n".join(rows), flush=True)
            if "tta" in args.sections:
                ade = bundle_for(model, args.repository, Path(scratch), target)
                tta += tta_table(
                    model, ade, args.repository, Path(scratch), target, photos["astronaut"],
                    args.repeats,
                )  # fmt: skip
            if not set(args.sections) & {"latency", "throughput", "slide"}:
                continue
            bundle = bundle_for(model, args.repository, Path(scratch), target)
            weights = {"random init": bundle}
            if "slide" in args.sections:
                refitted = Path(scratch) / f"{model}-refitted"
                weights["refitted"] = refitted_bundle(bundle, wide, MODES["slide"], refitted)
            for kind, weighted in weights.items():
                # Latency and the default-batch slide row use the default engine settings; on
                # CPU one input per batch is faster (see the throughput table), hence a second
                # slide row with max_batch_size 1.
                default_batch = EngineConfig.max_batch_size
                for max_batch in (
                    (default_batch, 1) if "slide" in args.sections else (default_batch,)
                ):
                    engine = Engine(weighted, target.engine_config(max_batch_size=max_batch))
                    engine.start()
                    try:
                        first_run = kind == "random init" and max_batch == default_batch
                        if "latency" in args.sections and first_run:
                            latency += latency_table(engine, photos, args.repeats)
                        if "slide" in args.sections:
                            overhead.append(slide_overhead(engine, wide, args.repeats, kind))
                    finally:
                        engine.stop()
            if "throughput" not in args.sections:
                continue
            baselines = torch_models(model, bundle.metadata.num_classes, target)
            for batch in args.batch_sizes:
                row = throughput_row(model, bundle, baselines, squares, batch, args.repeats, target)
                throughput.append(row)
                print(row, flush=True)

    if postprocess:
        print(f"\n## Engine against PyTorch eager (images/s), {target.device} {target.precision}")
        print(
            "| bundle | device | mode, image | batch | post-processing | engine | eager | ratio |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- |"
        )
        print("\n".join(postprocess))
    if tta:
        print("\n## Multi-scale + flip: tile-wise mean softmax (service/ttamap.py)")
        print(
            "| model | weights, passes | image | passes | inputs | single-pass requests (ms) "
            "| TTA request (ms) | ratio | peak RSS above idle (MiB) | exact tiles "
            "| label step (ms) | label step without pruning (ms) |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(tta))
    if not set(args.sections) & {"latency", "throughput", "slide"}:
        return
    print(f"\n## Latency (ms), engine, {target.device} {target.precision}")
    print("| model | mode | runs | inputs (astronaut) | median | p95 |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(latency))
    print("\n## Throughput (images/s), 512x512, whole mode")
    print(
        "| model | batch | engine | models/ eager | HF eager | vs models/ | vs HF |\n"
        "| --- | --- | --- | --- | --- | --- | --- |"
    )
    print("\n".join(throughput))
    print("\n## Slide overhead (2048x1024 image, 512x512 crops, stride 341)")
    print(
        "| model | weights | max batch | image -> resized | windows "
        "| window forwards alone (ms) | engine (ms) | ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(overhead))


if __name__ == "__main__":
    main()

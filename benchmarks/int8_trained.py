"""int8 bundles on trained weights: label agreement with fp32, accuracy and forward speed.

The exporter measures int8 label agreement on the bundle itself when its weights are trained,
and on a twin with a refitted classifier when they are random (docs/export.md). No trained
checkpoint is available offline, and the twin reads random features through a classifier fitted
to random superpixels, which amplifies the quantization error. This script makes a small trained
network instead: HF SegFormer-B0 trained from scratch for a few minutes (1000 steps of 8
128x128 crops, ~5 min on 2 CPU cores) to tell apart eight scikit-image photographs and textures
in random Voronoi mosaics. It then exports that checkpoint with the real exporter at fp32 and at
int8, and compares the two graphs:

- label agreement on held-out 512x512 mosaics, on the exporter's own agreement photos (chelsea,
  coffee: training sources), and on ten photographs the network never saw;
- accuracy of both against the mosaics' true labels;
- the forward at 512x512, fp32 and int8 alternating, in the service's session options.

    PYTHONPATH=. python benchmarks/int8_trained.py --work /tmp/int8-trained
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from skimage import data

SOURCES = ("brick", "grass", "gravel", "coffee", "chelsea", "astronaut", "rocket", "moon")
UNSEEN = (
    "camera",
    "coins",
    "page",
    "text",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
    "colorwheel",
    "clock",
    "logo",
)
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)


def _rgb(name: str) -> np.ndarray:
    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def mosaic(
    rng: np.random.Generator, images: list[np.ndarray], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A size x size RGB mosaic of 3-8 Voronoi regions, each a random crop (scaled 0.5-1.5x)
    of a random source; its labels are the sources' indices."""
    regions = int(rng.integers(3, 9))
    seeds = rng.uniform(0, size, (regions, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    owner = np.argmin((yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2, -1)
    classes = rng.integers(0, len(images), regions)
    image = np.zeros((size, size, 3), np.uint8)
    labels = np.zeros((size, size), np.int64)
    for region, cls in enumerate(classes):
        scale = rng.uniform(0.5, 1.5)
        source = cv2.resize(images[cls], None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        if min(source.shape[:2]) < size:
            source = cv2.resize(images[cls], (2 * size, 2 * size))
        top = rng.integers(0, source.shape[0] - size + 1)
        left = rng.integers(0, source.shape[1] - size + 1)
        inside = owner == region
        image[inside] = source[top : top + size, left : left + size][inside]
        labels[inside] = cls
    return image, labels


def train(out: Path, steps: int) -> float:
    """Train B0 on 128x128 mosaics; save it as an HF checkpoint with a classes file; return its
    pixel accuracy on 16 held-out 256x256 mosaics."""
    import torch
    import torch.nn.functional as F
    from transformers import (
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessorPil,
    )

    torch.manual_seed(0)
    images = [_rgb(name) for name in SOURCES]
    names = dict(enumerate(SOURCES))
    config = SegformerConfig(
        num_labels=len(SOURCES), id2label=names, label2id={n: i for i, n in names.items()}
    )
    model = SegformerForSemanticSegmentation(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=6e-4, total_steps=steps, pct_start=0.1
    )

    def batch(rng: np.random.Generator, count: int, size: int) -> tuple[torch.Tensor, ...]:
        pairs = [mosaic(rng, images, size) for _ in range(count)]
        pixels = (np.stack([p[0] for p in pairs]).astype(np.float32) - MEAN) / STD
        return (
            torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(np.stack([p[1] for p in pairs])),
        )

    def upsampled(logits: torch.Tensor, size: int) -> torch.Tensor:
        return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        pixels, target = batch(rng, 8, 128)
        loss = F.cross_entropy(upsampled(model(pixel_values=pixels).logits, 128), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}, {time.perf_counter() - started:.0f} s")
    model.eval()
    with torch.no_grad():
        pixels, target = batch(np.random.default_rng(123), 16, 256)
        accuracy = upsampled(model(pixel_values=pixels).logits, 256).argmax(1) == target
    model.save_pretrained(out)
    SegformerImageProcessorPil(size={"height": 512, "width": 512}).save_pretrained(out)
    (out / "classes.txt").write_text("\n".join(SOURCES) + "\n")
    return float(accuracy.float().mean())


def export(checkpoint: Path, out: Path, precision: str) -> Path:
    subprocess.run(
        [sys.executable, "-m", "export", "--model", "segformer-b0", "--checkpoint", str(checkpoint),
         "--classes", str(checkpoint / "classes.txt"), "--out", str(out), "--precision", precision,
         "--verify-size", "512x512", "--force"],
        check=True,
    )  # fmt: skip
    return out / "1" / "model.onnx"


def accuracy(model: Path, batches: list[np.ndarray], truth: list[np.ndarray]) -> float:
    from export.quantize import cpu_session, labels

    session = cpu_session(model)
    return float(
        np.mean([(labels(session, b)[0] == t).mean() for b, t in zip(batches, truth, strict=True)])
    )


def forwards(fp32: Path, int8: Path, batch: np.ndarray, rounds: int) -> tuple[float, float]:
    """Median forward ms of each graph, alternating, in the service's session options."""
    from service.config import RuntimeSettings
    from service.runtime import Runtime

    def runtime(model: Path) -> Runtime:
        import onnx

        graph = onnx.load(str(model), load_external_data=False).graph
        settings = RuntimeSettings(providers=("cpu",), parallel_runs=1)
        return Runtime(model, graph.input[0].name, graph.output[0].name, "uint8", settings)

    sessions = [runtime(fp32), runtime(int8)]
    times: list[list[float]] = [[], []]
    for round_ in range(rounds + 3):
        for index, session in enumerate(sessions):
            started = time.perf_counter()
            session.run(batch)
            if round_ >= 3:
                times[index].append((time.perf_counter() - started) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="checkpoint and bundles here")
    parser.add_argument("--steps", type=int, default=1000, help="training steps")
    parser.add_argument("--rounds", type=int, default=20, help="forward rounds per graph")
    args = parser.parse_args()
    from export.quantize import AGREEMENT_PHOTOS, label_agreement, photos

    checkpoint = args.work / "hf"
    held_out = train(checkpoint, args.steps)
    fp32 = export(checkpoint, args.work / "repo" / "textures", "fp32")
    int8 = export(checkpoint, args.work / "repo" / "textures-int8", "int8")

    rng = np.random.default_rng(7)
    images = [_rgb(name) for name in SOURCES]
    pairs = [mosaic(rng, images, 512) for _ in range(8)]
    mosaics = [image.transpose(2, 0, 1)[None].copy() for image, _ in pairs]
    truth = [target for _, target in pairs]
    fp32_ms, int8_ms = forwards(fp32, int8, mosaics[0], args.rounds)
    print(f"\nSegFormer-B0 trained {args.steps} steps on mosaics of {', '.join(SOURCES)}: "
          f"held-out pixel accuracy {held_out:.1%} (PyTorch)")  # fmt: skip
    print("| measure | value |")
    print("| --- | --- |")
    rows = [
        (
            "int8 / fp32 label agreement, 8 held-out 512x512 mosaics",
            label_agreement(fp32, int8, mosaics),
        ),
        (
            f"same, the exporter's agreement photos ({', '.join(AGREEMENT_PHOTOS)})",
            label_agreement(fp32, int8, photos(AGREEMENT_PHOTOS)),
        ),
        (
            f"same, {len(UNSEEN)} photographs never trained on",
            label_agreement(fp32, int8, photos(UNSEEN)),
        ),
        ("fp32 accuracy on the mosaics", accuracy(fp32, mosaics, truth)),
        ("int8 accuracy on the mosaics", accuracy(int8, mosaics, truth)),
    ]
    for name, value in rows:
        print(f"| {name} | {value:.2%} |")
    print(f"| forward 512x512, fp32 / int8 (medians of {args.rounds}) | {fp32_ms:.1f} / "
          f"{int8_ms:.1f} ms: {fp32_ms / int8_ms:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()

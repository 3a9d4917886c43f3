"""``python -m export``: the command line around ``export.export_bundle``.

Prints the export report on success; on a user error or a failed check prints one line,
``error: ...``, and exits with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export.attention import ATTENTION_FORMS
from export.bundle_writer import DEFAULT_ATTENTION, ExportError, export_bundle
from export.verify import DEFAULT_SIZES


def _size(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit() or min(int(height), int(width)) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH, e.g. 384x640, got {text!r}")
    return int(height), int(width)


def _sizes_text(sizes: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(f"{h}x{w}" for h, w in sizes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export", description="Export a segmentation model to a verified bundle."
    )
    parser.add_argument("--model", required=True, help="registry name, e.g. segformer-b0")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, help="HF dir, NVlabs or mmseg .pth")
    weights.add_argument(
        "--random-init", action="store_true", help="untrained weights (tests, benchmarks)"
    )
    parser.add_argument("--out", type=Path, required=True, help="model_repository/NAME")
    classes = parser.add_mutually_exclusive_group()
    classes.add_argument("--dataset", help="ade20k | cityscapes | pascal-context | coco-stuff")
    classes.add_argument("--classes", type=Path, help="file with one class name per line")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32")
    parser.add_argument("--opset", type=int, default=23)
    parser.add_argument(
        "--attention",
        choices=ATTENTION_FORMS,
        default=None,
        help=f"fused attention form (default: {DEFAULT_ATTENTION})",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing bundle")
    parser.add_argument(
        "--verify-size",
        type=_size,
        action="append",
        metavar="HxW",
        help=f"verification size, repeatable (default: {_sizes_text(DEFAULT_SIZES)})",
    )
    parser.add_argument("--skip-verify", action="store_true", help="do not compare against PyTorch")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = export_bundle(
            args.model,
            args.out,
            checkpoint=args.checkpoint,
            random_init=args.random_init,
            dataset=args.dataset,
            classes_file=args.classes,
            precision=args.precision,
            opset=args.opset,
            attention=args.attention,
            force=args.force,
            skip_verify=args.skip_verify,
            verify_sizes=tuple(args.verify_size or DEFAULT_SIZES),
            progress=lambda message: print(f"... {message}", file=sys.stderr, flush=True),
        )
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A slow, plain restatement of mmsegmentation 1.x test-time inference, to check the engine.

Written from mmseg's ``EncoderDecoder.whole_inference`` / ``slide_inference`` /
``postprocess_result``, ``SegTTAModel.merge_preds`` and mmcv's ``Resize`` / ``imrescale``: one
image at a time, one window at a time, PyTorch ``F.interpolate`` / ``F.pad`` / ``softmax`` for the
tensor work (what mmseg itself calls) and ``cv2.resize`` for the image (what mmcv calls). It shares
no code with ``service/``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from service.bundle import Bundle

# (1, 3, h, w) float32 pixels on the 0-255 scale -> (1, C, h', w') logits.
Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ReferenceConfig:
    mode: str
    resize_scale: tuple[int, int] | None
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None


def onnx_forward(bundle: Bundle, pad_to: int = 0) -> Forward:
    """Run the bundle's graph one image at a time, normalising first when the graph does not.

    ``pad_to``: inputs with a side under it are padded bottom/right to it, as mmseg's data
    preprocessor pads at test time (with 0 after normalisation, i.e. the mean colour; a uint8
    graph gets the mean rounded), and the logits, resized to the padded size, lose the padding
    (``predict_by_feat`` with ``pad_shape``, then ``postprocess_result``)."""
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    contract = bundle.metadata.input
    mean = torch.tensor(contract.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(contract.std, dtype=torch.float32).view(1, 3, 1, 1)
    pad_colour = mean.round() if contract.dtype == "uint8" else mean

    def run(pixels: torch.Tensor) -> torch.Tensor:
        if contract.normalized_in_graph:
            feed = pixels.numpy().astype(contract.dtype)
        else:
            feed = ((pixels - mean) / std).numpy().astype(contract.dtype)
        (logits,) = session.run([bundle.metadata.output.name], {contract.name: feed})
        return torch.from_numpy(np.asarray(logits, dtype=np.float32))

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[2:]
        padded_size = (max(height, pad_to), max(width, pad_to))
        if padded_size == (height, width):
            return run(pixels)
        padded = pad_colour.expand(1, 3, *padded_size).clone()
        padded[:, :, :height, :width] = pixels
        logits = F.interpolate(run(padded), size=padded_size, mode="bilinear", align_corners=False)
        return logits[:, :, :height, :width]

    return forward


def mmcv_resize_keep_ratio(image: np.ndarray, scale: tuple[int, int]) -> np.ndarray:
    """mmcv.imrescale(image, scale): fit (long, short) edges, round each side half up."""
    h, w = image.shape[:2]
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    new_w, new_h = int(w * factor + 0.5), int(h * factor + 0.5)
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def mmcv_resize_ratio(image: np.ndarray, ratio: float) -> np.ndarray:
    """mmcv Resize(scale_factor=ratio, keep_ratio=True): target = scaled size, then imrescale."""
    h, w = image.shape[:2]
    target = (int(w * ratio + 0.5), int(h * ratio + 0.5))
    return mmcv_resize_keep_ratio(image, target)


def _encode_decode(forward: Forward, pixels: torch.Tensor) -> torch.Tensor:
    """Logits resized to the input's size, as ``decode_head.predict`` does."""
    logits = forward(pixels)
    return F.interpolate(logits, size=pixels.shape[2:], mode="bilinear", align_corners=False)


def _whole(forward: Forward, pixels: torch.Tensor) -> torch.Tensor:
    return _encode_decode(forward, pixels)


def _slide(
    forward: Forward, pixels: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    h_stride, w_stride = stride
    h_crop, w_crop = crop
    _, _, h_img, w_img = pixels.shape
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds: torch.Tensor | None = None
    count_mat = torch.zeros((1, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_logits = _encode_decode(forward, pixels[:, :, y1:y2, x1:x2])
            if preds is None:
                preds = torch.zeros((1, crop_logits.shape[1], h_img, w_img))
            preds += F.pad(crop_logits, (x1, w_img - x2, y1, h_img - y2))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert preds is not None and int((count_mat == 0).sum()) == 0
    return preds / count_mat


def _one_pass(
    forward: Forward, image: np.ndarray, config: ReferenceConfig, flip: bool, ori: tuple[int, int]
) -> torch.Tensor:
    """Logits (C, H, W) at the original size for one (already resized) image."""
    if flip:
        image = image[:, ::-1]
    pixels = torch.from_numpy(np.ascontiguousarray(image).astype(np.float32))
    pixels = pixels.permute(2, 0, 1)[None]
    if config.mode == "slide":
        assert config.crop is not None and config.stride is not None
        logits = _slide(forward, pixels, config.crop, config.stride)
    else:
        logits = _whole(forward, pixels)
    if flip:
        logits = logits.flip(dims=(3,))
    return F.interpolate(logits, size=ori, mode="bilinear", align_corners=False)[0]


@torch.no_grad()
def reference_segment(
    forward: Forward,
    image: np.ndarray,
    config: ReferenceConfig,
    scales: tuple[float, ...] | None = None,
    flip: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (H, W) int64, scores (C, H, W) float32): logits for one pass, else the mean
    softmax over scales x flips (``SegTTAModel``)."""
    ori = image.shape[:2]
    if scales is None:
        resized = [
            mmcv_resize_keep_ratio(image, config.resize_scale) if config.resize_scale else image
        ]
    else:
        resized = [mmcv_resize_ratio(image, ratio) for ratio in scales]
    flips = (False, True) if flip else (False,)
    outputs = [_one_pass(forward, img, config, f, ori) for img in resized for f in flips]
    if len(outputs) == 1:
        scores = outputs[0]
    else:
        scores = torch.zeros_like(outputs[0])
        for logits in outputs:
            scores += logits.softmax(dim=0)
        scores /= len(outputs)
    return scores.argmax(dim=0).numpy(), scores.numpy()

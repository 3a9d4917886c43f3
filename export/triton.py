"""Triton Inference Server ``config.pbtxt`` for a bundle (protobuf text format, ModelConfig).

With ``max_batch_size > 0`` Triton's dims exclude the batch axis; -1 marks the dynamic height and
width (and the logits' spatial size, which follows the input's at the model's stride).
"""

from __future__ import annotations

from typing import Literal

DEFAULT_MAX_BATCH_SIZE = 8

_TRITON_TYPES = {"uint8": "TYPE_UINT8", "float32": "TYPE_FP32", "float16": "TYPE_FP16"}

TensorType = Literal["uint8", "float32", "float16"]


def triton_config(
    name: str,
    *,
    input_name: str,
    input_dtype: TensorType,
    output_name: str,
    output_dtype: TensorType,
    num_classes: int,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> str:
    """The config.pbtxt text for an ONNX segmentation model: NCHW pixels in, NCHW logits out."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be positive, got {max_batch_size}")
    if '"' in name or "\\" in name:
        raise ValueError(f"model name {name!r} cannot hold quotes or backslashes")
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        "  {\n"
        f'    name: "{input_name}"\n'
        f"    data_type: {_TRITON_TYPES[input_dtype]}\n"
        "    dims: [ 3, -1, -1 ]\n"
        "  }\n"
        "]\n"
        "output [\n"
        "  {\n"
        f'    name: "{output_name}"\n'
        f"    data_type: {_TRITON_TYPES[output_dtype]}\n"
        f"    dims: [ {num_classes}, -1, -1 ]\n"
        "  }\n"
        "]\n"
        "dynamic_batching { }\n"
    )

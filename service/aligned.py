"""A CPU twin of a bundle's graph whose upsamplings run at constant integer scales, for inputs
whose sides are multiples of the model's stride (``STRIDE`` in ``service/bundle.py``).

Why: the exporter writes each bilinear upsampling as a ``Resize`` to a size computed from the
shapes, so one graph serves any input size. onnxruntime's CPU provider runs convolutions in a
blocked layout (NCHWc) and keeps a chain of them blocked, but its rule for ``Resize`` takes only
constant integer ``scales``; a ``Resize`` to a computed size runs in NCHW between a reorder out
of the blocked layout and one back, and so do the sum of the upsampled levels, the ReLU and the
classifier that follow it. With the scales constant, SegFormer-B0's decoder stays blocked: its
512×512 forward takes 68 ms instead of 77 on this VM's two threads, and 116 instead of 133 on
one (docs/benchmarks.md).

Why it is exact: at sides that are multiples of the stride, every stride-2 stage halves exactly,
so each upsampling's output is its input times the same integer for all such inputs, and a
``Resize`` by that scale maps output to input coordinates as one by size (the ratio is the same
number). Nothing here assumes it of a graph: the ratios are measured at two probe shapes of
different aspect, only those that agree and are integers become constants, and the twin must
give the graph's logits at a third shape, or no twin is made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

# The twin's logits against the graph's, relative to their largest magnitude: the blocked
# kernels sum in another order (float32 noise is ~1e-7; float16 graphs get ~1e-3).
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-2}


def is_aligned(shape: tuple[int, ...], side: int) -> bool:
    """Whether an (N, 3, H, W) input is one the twin of a graph aligned to ``side`` serves."""
    return side > 0 and shape[-2] % side == 0 and shape[-1] % side == 0


def aligned_twin(model_path: Path, input_dtype: np.dtype, side: int) -> bytes | None:
    """The serialized twin of the graph at ``model_path``, or None when it would not differ (no
    ``Resize`` to a size whose ratio is one integer at both probe shapes) or could not be held
    in one serialized model (weights in external files: models near protobuf's 2 GB limit).
    Check it against the graph with ``twin_mismatch`` before serving from it."""
    model = onnx.load(str(model_path), load_external_data=False)
    if any(uses_external_data(tensor) for tensor in model.graph.initializer):
        return None
    resizes = [n for n in model.graph.node if n.op_type == "Resize" and _sized(n)]
    if not resizes:
        return None
    first, second = (_ratios(model, resizes, shape, input_dtype) for shape in _probes(side))
    constant = [
        (node, ratio)
        for node, ratio, other in zip(resizes, first, second, strict=True)
        if ratio == other and ratio is not None
    ]
    if not constant:
        return None
    for index, (node, ratio) in enumerate(constant):
        name = f"__aligned_scales_{index}"
        scales = np.array([1, 1, *ratio], np.float32)
        model.graph.initializer.append(numpy_helper.from_array(scales, name))
        node.input[:] = [node.input[0], node.input[1], name]
    _drop_unused(model.graph)
    return model.SerializeToString()


def twin_mismatch(
    twin: ort.InferenceSession,
    graph: ort.InferenceSession,
    input_name: str,
    input_dtype: np.dtype,
    side: int,
) -> str:
    """Empty when the twin's logits match the graph's for a random input of an aligned shape
    neither probe had; otherwise what differs."""
    shape = (1, 3, 4 * side, 5 * side)
    rng = np.random.default_rng(0)
    if input_dtype == np.uint8:
        sample = rng.integers(0, 256, shape, dtype=np.uint8)
    else:
        sample = rng.standard_normal(shape).astype(input_dtype)
    expected = graph.run(None, {input_name: sample})[0]
    try:
        got = twin.run(None, {input_name: sample})[0]
    except (Fail, InvalidArgument, RuntimeException) as exc:
        return f"the twin fails at {shape[2:]}: {exc}"
    if got.shape != expected.shape:
        return f"logits {got.shape} at {shape[2:]} where the graph gives {expected.shape}"
    scale = float(np.abs(expected).max(initial=0.0)) or 1.0
    error = float(np.abs(got.astype(np.float32) - expected.astype(np.float32)).max()) / scale
    tolerance = TOLERANCE.get(expected.dtype, 1e-4)
    if error > tolerance:
        return f"logits differ by {error:.2e} of their range at {shape[2:]} (over {tolerance})"
    return ""


def _sized(node: onnx.NodeProto) -> bool:
    """A Resize to a computed size: (X, roi, scales, sizes) with sizes given and no scales."""
    return len(node.input) == 4 and bool(node.input[3]) and not node.input[2]


def _probes(side: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    return (1, 3, 2 * side, 3 * side), (1, 3, 3 * side, 2 * side)


def _ratios(
    model: onnx.ModelProto,
    resizes: list[onnx.NodeProto],
    shape: tuple[int, ...],
    input_dtype: np.dtype,
) -> list[tuple[int, int] | None]:
    """Each Resize's (height, width) output/input ratio when ``model`` runs an input of ``shape``:
    integers, or None where either is not one."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.ClearField("output")
    names = []
    for index, node in enumerate(resizes):
        for end, tensor in (("in", node.input[0]), ("out", node.output[0])):
            name = f"__aligned_probe_{index}_{end}"
            probe.graph.node.append(helper.make_node("Shape", [tensor], [name]))
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT64, [4]))
            names.append(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1  # shapes of tiny inputs: no thread pool to start
    session = ort.InferenceSession(
        probe.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    input_name = model.graph.input[0].name
    shapes = session.run(names, {input_name: np.zeros(shape, input_dtype)})
    ratios: list[tuple[int, int] | None] = []
    for before, after in zip(shapes[::2], shapes[1::2], strict=True):
        height, width = after[2] / before[2], after[3] / before[3]
        integral = height.is_integer() and width.is_integer()
        ratios.append((int(height), int(width)) if integral else None)
    return ratios


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes nothing reads (the size arithmetic the constant scales replaced): left in,
    onnxruntime would still run them, and reorder their inputs out of the blocked layout."""
    while True:
        read = {name for node in graph.node for name in node.input}
        read |= {output.name for output in graph.output}
        unused = [node for node in graph.node if not read.intersection(node.output)]
        if not unused:
            return
        for node in unused:
            graph.node.remove(node)

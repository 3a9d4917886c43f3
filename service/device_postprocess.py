"""Post-processing as ONNX graphs on the model's own execution provider (``postprocess=device``).

Why: on a GPU the host label step (``labelmap``, 10-50 ms per image on a CPU core) costs more
than a SegFormer-B0 forward, and it needs the logits copied to the host first. Here the same
mmseg steps (``service/merging.py`` states them) run as small ONNX graphs in onnxruntime sessions
on the model's provider, fed through IO binding: the model's output OrtValues stay on the
device, each window is bound by address inside its batch's output, and only the label map
(H x W bytes; the probabilities too when asked) is copied back. Under CUDA this is the default
(``postprocess=auto``); on the CPU provider the same graphs and bindings run on host memory,
which is how the tests check them against ``tests/reference.py`` and the host path.

The graphs are built here with ``onnx.helper`` when an engine starts, not written into bundles
at export: every bundle (older ones, test bundles, Triton's) gets them, and a fix needs no
re-export. Every size is a runtime input (``Resize`` ``sizes``, ``Pad`` ``pads``), so one
session per graph serves every image and window size:

- ``window_sum`` (slide, one window): logits resized to the window (``Resize`` linear,
  ``half_pixel`` = ``F.interpolate`` bilinear, align_corners False), padded to the resized
  image at the window's offset, added to the pass's running sum (a fresh device buffer).
- ``pass`` (one pass): divided by the per-pixel window count (a row and a column factor:
  mmseg's window grid is a product of row and column intervals), resized to the pass's image
  size (for a single window; a no-op for a merged sum), flipped back (``Slice`` with step -1),
  resized to the original size; then ``ArgMax`` to uint8/uint16 labels, with the softmax when
  probabilities are asked, or its softmax added to the TTA sum.
- ``mean`` (TTA): the sum over passes divided by their number, ``ArgMax``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from service.geometry import Window
from service.planning import PassPlan

OPSET = 17
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min
Device = Literal["cpu", "cuda"]
PassOutput = Literal["labels", "probabilities", "softmax"]

_ONNX_TYPES = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.uint16): TensorProto.UINT16,
}


@dataclass(frozen=True)
class DeviceTensor:
    """A tensor in the memory of a session's device, by address: a whole OrtValue, or one item
    of a batch inside it. ``owner`` keeps that memory alive while the tensor is in use."""

    owner: ort.OrtValue
    address: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def of(cls, value: ort.OrtValue) -> DeviceTensor:
        return cls(value, value.data_ptr(), tuple(value.shape()), numpy_dtype(value))


class DeviceBatch:
    """A model's (N, C, h, w) output left on its device; ``batch[i]`` is item i as a
    (1, C, h, w) ``DeviceTensor`` (what the batcher hands to each window's future)."""

    def __init__(self, value: ort.OrtValue) -> None:
        self._whole = DeviceTensor.of(value)
        self._item_bytes = int(np.prod(self._whole.shape[1:])) * self._whole.dtype.itemsize

    def __len__(self) -> int:
        return self._whole.shape[0]

    def __getitem__(self, index: int) -> DeviceTensor:
        if not 0 <= index < len(self):
            raise IndexError(index)
        whole = self._whole
        return DeviceTensor(
            whole.owner,
            whole.address + index * self._item_bytes,
            (1, *whole.shape[1:]),
            whole.dtype,
        )


def numpy_dtype(value: ort.OrtValue) -> np.dtype:
    """The dtype of a float tensor OrtValue (model outputs are float32 or float16)."""
    names = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    return np.dtype(names[value.data_type()])


# ----------------------------------------------------------------------------- graphs


def _tensor(name: str, elem_type: int, shape: list[str | int]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def _elem(dtype: np.dtype) -> int:
    return _ONNX_TYPES[np.dtype(dtype)]


def _sizes(name: str) -> onnx.ValueInfoProto:
    return _tensor(name, TensorProto.INT64, [4])


def _resize(source: str, sizes: str, out: str) -> onnx.NodeProto:
    """``F.interpolate(mode="bilinear", align_corners=False)``: half-pixel centres, no
    antialiasing; onnxruntime clamps source coordinates at the edges like torch."""
    return helper.make_node(
        "Resize",
        [source, "", "", sizes],
        [out],
        mode="linear",
        coordinate_transformation_mode="half_pixel",
    )


def _model(
    name: str,
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] | None = None,
) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def window_sum_graph(logits_dtype: np.dtype, first: bool) -> bytes:
    """``sum_out = [sum +] Pad(Resize(logits, window_size), pads)`` in float32."""
    nodes = [
        helper.make_node("Cast", ["logits"], ["logits_f"], to=TensorProto.FLOAT),
        _resize("logits_f", "window_size", "resized"),
        helper.make_node("Pad", ["resized", "pads"], ["placed" if not first else "sum_out"]),
    ]
    inputs = [
        _tensor("logits", _elem(logits_dtype), [1, "C", "h", "w"]),
        _sizes("window_size"),
        _tensor("pads", TensorProto.INT64, [8]),
    ]
    if not first:
        nodes.append(helper.make_node("Add", ["sum", "placed"], ["sum_out"]))
        inputs.append(_tensor("sum", TensorProto.FLOAT, [1, "C", "H", "W"]))
    outputs = [_tensor("sum_out", TensorProto.FLOAT, [1, "C", "H", "W"])]
    return _model("window_sum", nodes, inputs, outputs)


def unpad_graph(logits_dtype: np.dtype) -> bytes:
    """A padded input's logits resized to the padded size and cropped to the real one
    (``geometry.unpad_logits``), in float32."""
    nodes = [
        helper.make_node("Cast", ["logits"], ["logits_f"], to=TensorProto.FLOAT),
        _resize("logits_f", "padded_size", "resized"),
        helper.make_node("Slice", ["resized", "starts", "ends", "axes"], ["unpadded"]),
    ]
    inputs = [
        _tensor("logits", _elem(logits_dtype), [1, "C", "h", "w"]),
        _sizes("padded_size"),
        _tensor("starts", TensorProto.INT64, [2]),
        _tensor("ends", TensorProto.INT64, [2]),
        _tensor("axes", TensorProto.INT64, [2]),
    ]
    outputs = [_tensor("unpadded", TensorProto.FLOAT, [1, "C", "H", "W"])]
    return _model("unpad", nodes, inputs, outputs)


def pass_graph(
    logits_dtype: np.dtype, labels_dtype: np.dtype, output: PassOutput, accumulate: bool
) -> bytes:
    """One pass's logits to the original size, then labels (and probabilities), or the softmax
    (added to ``total`` when ``accumulate``)."""
    nodes = [
        helper.make_node("Cast", ["logits"], ["logits_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["count_rows", "count_cols"], ["counts"]),
        helper.make_node("Div", ["logits_f", "counts"], ["averaged"]),
        _resize("averaged", "scaled_size", "scaled"),
        helper.make_node(
            "Slice", ["scaled", "flip_start", "flip_end", "width_axis", "flip_step"], ["unflipped"]
        ),
        _resize("unflipped", "original_size", "scores"),
    ]
    inputs = [
        _tensor("logits", _elem(logits_dtype), [1, "C", "h", "w"]),
        _tensor("count_rows", TensorProto.FLOAT, [1, 1, "h", 1]),
        _tensor("count_cols", TensorProto.FLOAT, [1, 1, 1, "w"]),
        _sizes("scaled_size"),
        _tensor("flip_start", TensorProto.INT64, [1]),
        _tensor("flip_end", TensorProto.INT64, [1]),
        _tensor("flip_step", TensorProto.INT64, [1]),
        _sizes("original_size"),
    ]
    initializers = [helper.make_tensor("width_axis", TensorProto.INT64, [1], [3])]
    outputs = []
    if output in ("labels", "probabilities"):
        nodes += _argmax("scores", labels_dtype)
        outputs.append(_tensor("labels", _elem(labels_dtype), [1, "H", "W"]))
    if output == "probabilities":
        nodes.append(helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1))
        outputs.append(_tensor("probabilities", TensorProto.FLOAT, [1, "C", "H", "W"]))
    if output == "softmax":
        softmax_out = "softmax" if accumulate else "total_out"
        nodes.append(helper.make_node("Softmax", ["scores"], [softmax_out], axis=1))
        if accumulate:
            nodes.append(helper.make_node("Add", ["total", "softmax"], ["total_out"]))
            inputs.append(_tensor("total", TensorProto.FLOAT, [1, "C", "H", "W"]))
        outputs.append(_tensor("total_out", TensorProto.FLOAT, [1, "C", "H", "W"]))
    return _model(f"pass_{output}", nodes, inputs, outputs, initializers)


def mean_graph(labels_dtype: np.dtype) -> bytes:
    """TTA: ``mean = total / passes``, its labels (argmax) and the mean itself."""
    nodes = [
        helper.make_node("Div", ["total", "passes"], ["mean"]),
        *_argmax("mean", labels_dtype),
    ]
    inputs = [
        _tensor("total", TensorProto.FLOAT, [1, "C", "H", "W"]),
        _tensor("passes", TensorProto.FLOAT, [1]),
    ]
    outputs = [
        _tensor("labels", _elem(labels_dtype), [1, "H", "W"]),
        _tensor("mean", TensorProto.FLOAT, [1, "C", "H", "W"]),
    ]
    return _model("mean", nodes, inputs, outputs)


def _argmax(scores: str, labels_dtype: np.dtype) -> list[onnx.NodeProto]:
    """First index on ties (``select_last_index=0``), like ``torch.argmax``."""
    return [
        helper.make_node("ArgMax", [scores], ["indices"], axis=1, keepdims=0),
        helper.make_node("Cast", ["indices"], ["labels"], to=_elem(labels_dtype)),
    ]


# ----------------------------------------------------------------------------- running them


class DevicePostprocess:
    """The post-processing sessions of one engine, on ``device`` (its model's provider)."""

    def __init__(
        self,
        device: Device,
        providers: list[tuple[str, dict[str, str]]],
        threads: int,
        num_classes: int,
        labels_dtype: type[np.unsignedinteger],
    ) -> None:
        self.device = device
        self.num_classes = num_classes
        self.labels_dtype = np.dtype(labels_dtype)
        self._providers = providers
        self._threads = threads
        self._sessions: dict[tuple[object, ...], ort.InferenceSession] = {}
        self._lock = threading.Lock()

    def _session(self, key: tuple[object, ...]) -> ort.InferenceSession:
        """Built on first use (``warm_up`` builds the common ones at load)."""
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                kind, *args = key
                graphs: dict[str, Callable[..., bytes]] = {
                    "window_sum": window_sum_graph,
                    "unpad": unpad_graph,
                    "pass": pass_graph,
                    "mean": mean_graph,
                }
                options = ort.SessionOptions()
                options.intra_op_num_threads = self._threads
                options.inter_op_num_threads = 1
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                options.enable_cpu_mem_arena = False
                session = ort.InferenceSession(
                    graphs[str(kind)](*args), sess_options=options, providers=self._providers
                )
                self._sessions[key] = session
            return session

    def _run(
        self,
        session: ort.InferenceSession,
        tensors: dict[str, DeviceTensor],
        host: dict[str, np.ndarray],
        outputs: tuple[str, ...],
    ) -> ort.IOBinding:
        """One run: ``tensors`` bound by address on the device, ``host`` arrays (sizes, small
        factors) copied by onnxruntime where its kernels want them, ``outputs`` (the others are
        not bound) left on the device for ``get_outputs`` or ``copy_outputs_to_cpu``."""
        binding = session.io_binding()
        for name, tensor in tensors.items():
            binding.bind_input(
                name, self.device, 0, tensor.dtype.type, list(tensor.shape), tensor.address
            )
        for name, array in host.items():
            binding.bind_cpu_input(name, array)
        for name in outputs:
            binding.bind_output(name, self.device, 0)
        session.run_with_iobinding(binding)
        return binding

    def add_window(
        self, total: DeviceTensor | None, logits: DeviceTensor, window: Window, plan: PassPlan
    ) -> DeviceTensor:
        """``total`` (None for the first window) plus ``logits`` resized to ``window`` and
        placed at its offset in the pass's image, as a new device buffer."""
        host = {
            "window_size": np.array([1, logits.shape[1], window.height, window.width], np.int64),
            "pads": np.array(
                [0, 0, window.y1, window.x1, 0, 0, plan.height - window.y2, plan.width - window.x2],
                np.int64,
            ),
        }
        tensors = {"logits": logits}
        if total is not None:
            tensors["sum"] = total
        session = self._session(("window_sum", logits.dtype, total is None))
        binding = self._run(session, tensors, host, ("sum_out",))
        return DeviceTensor.of(binding.get_outputs()[0])

    def unpad(
        self, logits: DeviceTensor, padded: tuple[int, int], size: tuple[int, int]
    ) -> DeviceTensor:
        """The logits of an input padded from ``size`` to ``padded`` (height, width), resized to
        the padded size with the padding cropped off, as a new device buffer."""
        host = {
            "padded_size": np.array([1, logits.shape[1], *padded], np.int64),
            "starts": np.zeros(2, np.int64),
            "ends": np.array(size, np.int64),
            "axes": np.array([2, 3], np.int64),
        }
        binding = self._run(
            self._session(("unpad", logits.dtype)), {"logits": logits}, host, ("unpadded",)
        )
        return DeviceTensor.of(binding.get_outputs()[0])

    def new_pass(self, plan: PassPlan) -> DevicePassMerge:
        return DevicePassMerge(self, plan)

    def pass_result(
        self, merge: DevicePassMerge, original: tuple[int, int], probabilities: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """A single pass's labels (H, W), and its (C, H, W) softmax when ``probabilities``."""
        if probabilities:
            binding = self._run_pass(merge, original, "probabilities", None)
            labels, softmax = binding.copy_outputs_to_cpu()
            return labels[0], softmax[0]
        return self._run_pass(merge, original, "labels", None).copy_outputs_to_cpu()[0][0], None

    def add_softmax(
        self, total: DeviceTensor | None, merge: DevicePassMerge, original: tuple[int, int]
    ) -> DeviceTensor:
        """The TTA sum with this pass's softmax at the original size added, on the device."""
        return DeviceTensor.of(self._run_pass(merge, original, "softmax", total).get_outputs()[0])

    def mean_result(
        self, total: DeviceTensor, passes: int, probabilities: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Labels of the mean softmax over ``passes``, and that mean when ``probabilities``."""
        session = self._session(("mean", self.labels_dtype))
        outputs = ("labels", "mean") if probabilities else ("labels",)
        host = {"passes": np.array([passes], np.float32)}
        values = self._run(session, {"total": total}, host, outputs).copy_outputs_to_cpu()
        return values[0][0], values[1][0] if probabilities else None

    def _run_pass(
        self,
        merge: DevicePassMerge,
        original: tuple[int, int],
        output: PassOutput,
        total: DeviceTensor | None,
    ) -> ort.IOBinding:
        logits, count_rows, count_cols = merge.averaging_inputs()
        plan = merge.plan
        key = ("pass", logits.dtype, self.labels_dtype, output, total is not None)
        flip = (-1, INT64_MIN, -1) if plan.flip else (0, INT64_MAX, 1)
        classes = logits.shape[1]
        host = {
            "count_rows": count_rows.reshape(1, 1, -1, 1),
            "count_cols": count_cols.reshape(1, 1, 1, -1),
            "scaled_size": np.array([1, classes, plan.height, plan.width], np.int64),
            "flip_start": np.array(flip[:1], np.int64),
            "flip_end": np.array(flip[1:2], np.int64),
            "flip_step": np.array(flip[2:], np.int64),
            "original_size": np.array([1, classes, *original], np.int64),
        }
        tensors = {"logits": logits}
        if total is not None:
            tensors["total"] = total
        outputs = {
            "labels": ("labels",),
            "probabilities": ("labels", "probabilities"),
            "softmax": ("total_out",),
        }[output]
        return self._run(self._session(key), tensors, host, outputs)

    def warm_up(self, logits_dtype: np.dtype) -> None:
        """Build every session requests use (and run each once), so that none is built or run
        for the first time inside a request: unpadding, a two-window and a one-window pass,
        with and without probabilities, and a two-pass TTA."""
        logits = np.zeros((2, self.num_classes, 4, 4), logits_dtype)
        batch = DeviceBatch(ort.OrtValue.ortvalue_from_numpy(logits, self.device, 0))
        grid = (Window(0, 16, 0, 16), Window(0, 16, 8, 24))
        self.unpad(batch[0], (16, 16), (13, 15))
        for plan in (PassPlan(16, 24, False, grid), PassPlan(16, 16, True, grid[:1])):
            merge = self.new_pass(plan)
            for index in range(len(plan.windows)):
                merge.add(index, batch[index])
            for probabilities in (False, True):
                self.pass_result(merge, (20, 30), probabilities)
                total = self.add_softmax(None, merge, (20, 30))
                total = self.add_softmax(total, merge, (20, 30))
                self.mean_result(total, 2, probabilities)


class DevicePassMerge:
    """One pass's logits on the device as its windows arrive (``merging.PassMerge``'s twin).

    A single window keeps the model's output as it is (resized in the ``pass`` graph); several
    are resized to their windows and summed at the pass's image size by ``window_sum``, one at a
    time under a lock, each into a fresh buffer (the graph cannot add in place)."""

    def __init__(self, postprocess: DevicePostprocess, plan: PassPlan) -> None:
        self.plan = plan
        self._postprocess = postprocess
        self._lock = threading.Lock()
        self._sum: DeviceTensor | None = None

    def add(self, index: int, logits: DeviceTensor) -> None:
        """Merge window ``index``'s (1, C, h, w) logits (thread-safe)."""
        windows = self.plan.windows
        if len(windows) == 1:
            self._sum = logits
            return
        with self._lock:
            self._sum = self._postprocess.add_window(self._sum, logits, windows[index], self.plan)

    def averaging_inputs(self) -> tuple[DeviceTensor, np.ndarray, np.ndarray]:
        """The pass's logits and the per-row and per-column window counts that divide them
        (ones for a single window); every window must have been added."""
        assert self._sum is not None, "no window merged"
        windows = self.plan.windows
        if len(windows) == 1:
            _, _, height, width = self._sum.shape
            return self._sum, np.ones(height, np.float32), np.ones(width, np.float32)
        rows = sorted({(w.y1, w.y2) for w in windows})
        cols = sorted({(w.x1, w.x2) for w in windows})
        assert len(rows) * len(cols) == len(windows), "windows must form a grid"
        return self._sum, _coverage(rows, self.plan.height), _coverage(cols, self.plan.width)


def _coverage(spans: list[tuple[int, int]], size: int) -> np.ndarray:
    """How many of ``spans`` cover each index of one axis (float32, as mmseg's count)."""
    counts = np.zeros(size, np.float32)
    for start, end in spans:
        counts[start:end] += 1.0
    return counts

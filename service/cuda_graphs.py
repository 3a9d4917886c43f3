"""Captured CUDA graphs for a model's fixed input shapes (``cuda_graphs`` setting, off by default).

Why: a SegFormer-B0 forward on an H100-class GPU is a few milliseconds of many small kernels, so
at small batches their launch cost is a large share of it; replaying a captured graph launches
them at once. onnxruntime's CUDA provider captures one graph per ``gpu_graph_id`` run option
(the session created with ``enable_cuda_graph``), and a graph replays on the addresses it was
captured with. So per fixed shape (the slide crop, or whole mode's test-scale square, at the
batch sizes ``capture_batch_sizes`` lists) an input and an output buffer are allocated on the
device and bound once; a batch is copied into its input in place (``OrtValue.update_inplace``)
and the graph replayed. A smaller batch is padded with zeros to the next captured size (its
extra outputs are ignored); other shapes run uncaptured (``gpu_graph_id`` -1: without it they
would be captured as graph 0). The output buffer is overwritten by the next replay, so device
post-processing gets a copy of it on the device (a one-node ``Identity`` session).

Written against onnxruntime's documented API (Python ``IOBinding``, ``OrtValue``, run config
``gpu_graph_id``); it has never run: no GPU was lent to the session that wrote it. The ``gpu``
tests in ``tests/unit/test_cuda_graphs.py`` check it against uncaptured runs when one is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from service.device_postprocess import numpy_dtype

log = logging.getLogger(__name__)

UNCAPTURED = "-1"  # gpu_graph_id for runs that must not be captured
WARM_RUNS = 3  # onnxruntime runs a graph id uncaptured before it captures it; replay after


def capture_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two below ``max_batch_size``, and it: every batch pads to at most twice its size,
    with a handful of graphs."""
    sizes = [1 << k for k in range(max_batch_size.bit_length()) if 1 << k < max_batch_size]
    return [*sizes, max_batch_size]


def pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """``batch`` with zero items appended up to ``size`` (itself when already that size)."""
    if batch.shape[0] == size:
        return batch
    padded = np.zeros((size, *batch.shape[1:]), batch.dtype)
    padded[: batch.shape[0]] = batch
    return padded


def copy_graph(dtype: np.dtype) -> bytes:
    """One ``Identity``: its output is a fresh buffer (a graph input is never reused)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["source"], ["copy"])],
        "device_copy",
        [helper.make_tensor_value_info("source", elem, ["N", "C", "h", "w"])],
        [helper.make_tensor_value_info("copy", elem, ["N", "C", "h", "w"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class DeviceCopy:
    """Copies an OrtValue into a new one on the same device (no host round trip)."""

    def __init__(self, dtype: np.dtype, device: str, providers: list[str]) -> None:
        options = ort.SessionOptions()
        # No optimiser may drop the Identity: it is the copy.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self._session = ort.InferenceSession(copy_graph(dtype), options, providers=providers)
        self._device = device

    def __call__(self, value: ort.OrtValue) -> ort.OrtValue:
        binding = self._session.io_binding()
        binding.bind_ortvalue_input("source", value)
        binding.bind_output("copy", self._device, 0)
        self._session.run_with_iobinding(binding)
        return binding.get_outputs()[0]


@dataclass
class _Graph:
    batch_size: int
    input: ort.OrtValue
    binding: ort.IOBinding
    options: ort.RunOptions


class CudaGraphs:
    """The captured graphs of one session (created with ``enable_cuda_graph``)."""

    def __init__(self, session: ort.InferenceSession, input_name: str, output_name: str) -> None:
        self._session = session
        self._input_name = input_name
        self._output_name = output_name
        self._graphs: dict[tuple[int, ...], _Graph] = {}  # by input shape
        self.uncaptured = ort.RunOptions()
        self.uncaptured.add_run_config_entry("gpu_graph_id", UNCAPTURED)
        self.copy: DeviceCopy | None = None

    def capture(self, shapes: list[tuple[int, ...]], input_dtype: np.dtype) -> None:
        """Allocate, bind and capture a graph per (N, 3, H, W) input shape."""
        for shape in shapes:
            if shape in self._graphs:
                continue
            graph_id = len(self._graphs) + 1
            device_input = ort.OrtValue.ortvalue_from_shape_and_type(
                list(shape), input_dtype.type, "cuda", 0
            )
            probe = self._session.io_binding()  # learn the output's shape and type, uncaptured
            probe.bind_ortvalue_input(self._input_name, device_input)
            probe.bind_output(self._output_name, "cuda", 0)
            self._session.run_with_iobinding(probe, self.uncaptured)
            output = probe.get_outputs()[0]
            output_dtype = numpy_dtype(output)
            device_output = ort.OrtValue.ortvalue_from_shape_and_type(
                output.shape(), output_dtype.type, "cuda", 0
            )
            binding = self._session.io_binding()
            binding.bind_ortvalue_input(self._input_name, device_input)
            binding.bind_ortvalue_output(self._output_name, device_output)
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
            for _ in range(WARM_RUNS):
                self._session.run_with_iobinding(binding, options)
            self._graphs[shape] = _Graph(shape[0], device_input, binding, options)
            if self.copy is None:
                self.copy = DeviceCopy(output_dtype, "cuda", ["CUDAExecutionProvider"])
            log.info("captured CUDA graph %d for input %s", graph_id, shape)

    def graph_for(self, shape: tuple[int, ...]) -> _Graph | None:
        """The captured graph of the smallest batch holding ``shape``'s, if any."""
        fitting = [
            graph
            for captured, graph in self._graphs.items()
            if captured[1:] == shape[1:] and captured[0] >= shape[0]
        ]
        return min(fitting, key=lambda graph: graph.batch_size, default=None)

    def run(self, batch: np.ndarray) -> ort.IOBinding | None:
        """Copy ``batch`` (padded) into the input of the graph that holds it and replay that;
        returns its binding, whose (padded) output stays valid until the graph's next replay.
        None when no graph holds this shape."""
        graph = self.graph_for(batch.shape)
        if graph is None:
            return None
        graph.input.update_inplace(pad_batch(batch, graph.batch_size))
        self._session.run_with_iobinding(graph.binding, graph.options)
        return graph.binding

"""The Open Inference Protocol (KServe v2) over REST, with Triton's binary tensor data extension,
so Triton and KServe clients (``tritonclient.http``, KServe's ``InferenceRESTClient``) call
segserve unchanged.

Same engine, batching, limits, API key and metrics as ``/segment``; failures keep the status of
``service/http/errors.py``'s table but answer with the protocol's body, ``{"error": "..."}``.
A model takes one input, ``image`` (the encoded file as a one-element BYTES tensor, sent as
binary data) or ``pixels`` (UINT8 H x W x 3, RGB), and answers ``labels`` (UINT8, or UINT16 above
256 classes, H x W) and, when asked for by name, ``probabilities`` (FP16, C x H x W, within the
request memory budget). Request parameters ``mode``, ``scales``, ``flip``, ``crop`` and
``stride`` mean what ``/segment``'s query parameters mean and go through the same planning.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service import __version__, errors
from service.engine import Engine, SegmentResult
from service.geometry import labels_dtype
from service.http.auth import API_KEY
from service.http.delivery import request_holding
from service.http.errors import (
    failure_headers,
    protocol_error,
    record_failure,
    status_of,
    validation_message,
)
from service.http.schemas import ProtocolError
from service.http.segment import parse_scales, parse_size
from service.http.state import Services, ServicesDep
from service.http.uploads import content_encoding, read_body_capped, until_disconnect
from service.imageio import decode_image
from service.manager import ModelsState
from service.metrics import STAGE_LATENCY
from service.planning import SegmentOptions, request_bytes

log = logging.getLogger("segserve.http")
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "segserve-bundle"  # the KServe model format this runtime serves (deploy/kserve/)
ENCODED_INPUT, PIXELS_INPUT = "image", "pixels"
LABELS_OUTPUT, PROBABILITIES_OUTPUT = "labels", "probabilities"
# Request parameters: the /segment options, and the extension's default for binary outputs.
OPTION_PARAMETERS = ("mode", "scales", "flip", "crop", "stride")
BINARY_OUTPUT_PARAMETER = "binary_data_output"
# Most numbers one answer may carry as JSON data (as Python objects while written, then text:
# about 130 MB for FP16); larger outputs must be asked for as binary data.
MAX_JSON_ELEMENTS = 4_000_000
# Most bytes of a request's JSON part (the header before any binary data). Parsed, a JSON number
# becomes a list slot and an int64 (16 bytes for 2-4 of text: a 19 MB body of pixels took 540 MB),
# so larger tensors must come as binary data; 4 MiB holds 1-2 million pixel values (a 600-800 px
# square RGB image).
MAX_JSON_REQUEST_BYTES = 4 * 1024 * 1024
# Bytes a parsed JSON part may take per byte of its text, held before parsing: a process's
# resident memory grew by up to 40x the text for arrays of empty objects ("[{},{},...]"), 26x for
# small numbers.
JSON_PARSE_BYTES_PER_BYTE = 40
# Request bodies tritonclient compresses (``request_compression_algorithm``): gzip.compress and
# zlib.compress, as zlib's window bits. Inflated in the pool, never past the upload limit.
REQUEST_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Each name serves one bundle, published as the protocol's model version "1".
MODEL_VERSION = "1"
# The only tensor parameters this server reads; another (Triton's ``classification``, a typo of
# ``binary_data``) is refused rather than silently ignored.
INPUT_PARAMETERS = ("binary_data_size",)
OUTPUT_PARAMETERS = ("binary_data",)
Parameters = dict[str, str | int | float | bool]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a size that varies per request")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class Liveness(BaseModel):
    live: bool


class Readiness(BaseModel):
    ready: bool


class ModelReadiness(BaseModel):
    name: str
    ready: bool


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: Parameters | None = None


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[int] | list[float] | None = None


class InferResponse(BaseModel):
    model_name: str
    id: str | None = None
    outputs: list[ResponseOutput]


class ProtocolRoute(APIRoute):
    """Answers failures with the protocol's error body (status and headers as elsewhere)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except errors.SegserveError as exc:
                record_failure(request, exc)
                return protocol_error(status_of(exc)[0], str(exc), failure_headers(exc))
            except RequestValidationError as exc:
                return protocol_error(422, validation_message(exc))
            except Exception:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return protocol_error(500, "internal server error (see the server log)")

        return answer


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ProtocolError} for status in (400, 401, 404, 413, 415, 422, 503, 504)
}
router = APIRouter(prefix="/v2", route_class=ProtocolRoute, tags=["Open Inference Protocol"])


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="segserve", version=__version__, extensions=EXTENSIONS)


@router.get("/health/live", response_model=Liveness)
async def server_live() -> Liveness:
    return Liveness(live=True)


@router.get("/health/ready", response_model=Readiness, responses={503: {"model": Readiness}})
async def server_ready(svc: ServicesDep) -> Response:
    """Ready when every model is loaded and warm and the server is not draining (inference
    needs no mask store, so the store's health is left to ``/readyz``)."""
    ready = svc.manager.state is ModelsState.READY and not svc.lifecycle.draining
    return JSONResponse(Readiness(ready=ready).model_dump(), 200 if ready else 503)


def _model(svc: Services, name: str, version: str = MODEL_VERSION) -> Engine:
    """The ready engine serving ``name``, whose one version is ``MODEL_VERSION``."""
    svc.manager.require_ready()
    engine = svc.manager.get(name)
    if version != MODEL_VERSION:
        raise errors.UnknownModelError(
            f"model {name!r} has no version {version!r}; its one version is {MODEL_VERSION!r}"
        )
    return engine


@router.get("/models/stats", include_in_schema=False)
@router.get("/models/{name}/stats", include_in_schema=False)
@router.get("/models/{name}/versions/{version}/stats", include_in_schema=False)
async def statistics() -> None:
    """Triton's statistics extension (``get_inference_statistics``) asks ``/v2/models/stats``,
    which would otherwise be read as a model named "stats"."""
    raise errors.UnknownModelError(
        "inference statistics (Triton's statistics extension) are not served: GET /v2 lists "
        "the extensions there are; segserve's counters and latencies are at /metrics"
    )


@router.get("/models/{name}", response_model=ModelMetadata, responses=ERRORS)
async def model_metadata(name: str, svc: ServicesDep) -> ModelMetadata:
    return _metadata(_model(svc, name))


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses=ERRORS)
async def model_version_metadata(name: str, version: str, svc: ServicesDep) -> ModelMetadata:
    return _metadata(_model(svc, name, version))


def _metadata(engine: Engine) -> ModelMetadata:
    num_classes = engine.bundle.metadata.num_classes
    return ModelMetadata(
        name=engine.name,
        versions=[MODEL_VERSION],
        platform=PLATFORM,
        inputs=[
            TensorMetadata(name=ENCODED_INPUT, datatype="BYTES", shape=[1]),
            TensorMetadata(name=PIXELS_INPUT, datatype="UINT8", shape=[-1, -1, 3]),
        ],
        outputs=[
            TensorMetadata(name=LABELS_OUTPUT, datatype=_labels_datatype(engine), shape=[-1, -1]),
            TensorMetadata(name=PROBABILITIES_OUTPUT, datatype="FP16", shape=[num_classes, -1, -1]),
        ],
    )


READY_ROUTE: dict[str, Any] = {
    "response_model": ModelReadiness,
    "responses": {**ERRORS, 503: {"model": ModelReadiness}},
}


@router.get("/models/{name}/ready", **READY_ROUTE)
async def model_ready(name: str, svc: ServicesDep) -> Response:
    return _readiness(_model(svc, name), svc)


@router.get("/models/{name}/versions/{version}/ready", **READY_ROUTE)
async def model_version_ready(name: str, version: str, svc: ServicesDep) -> Response:
    return _readiness(_model(svc, name, version), svc)


def _readiness(engine: Engine, svc: Services) -> Response:
    ready = engine.started and not svc.lifecycle.draining
    body = ModelReadiness(name=engine.name, ready=ready).model_dump()
    return JSONResponse(body, 200 if ready else 503)


INFER_ROUTE: dict[str, Any] = {
    "response_model": InferResponse,
    "responses": {
        **ERRORS,
        200: {
            "content": {"application/octet-stream": {}},
            "description": "JSON, or JSON "
            f"header of {HEADER_LENGTH} bytes followed by the binary outputs",
        },
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "description": "an InferRequest as JSON; with the binary data extension, the JSON "
            f"header ({HEADER_LENGTH} bytes) followed by the binary inputs",
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
    "dependencies": [API_KEY],
}


@router.post("/models/{name}/infer", **INFER_ROUTE)
async def infer(request: Request, name: str, svc: ServicesDep) -> Response:
    """Segment one image given as a tensor; outputs as JSON data or binary."""
    return await _infer(request, name, MODEL_VERSION, svc)


@router.post("/models/{name}/versions/{version}/infer", **INFER_ROUTE)
async def infer_version(request: Request, name: str, version: str, svc: ServicesDep) -> Response:
    return await _infer(request, name, version, svc)


async def _infer(request: Request, name: str, version: str, svc: Services) -> Response:
    settings = svc.settings
    holding = request_holding(request)
    with svc.lifecycle.track():
        engine = _model(svc, name, version)
        request.state.model = engine.name
        encoding = content_encoding(request, REQUEST_ENCODINGS)
        body = await read_body_capped(
            request, settings.max_upload_bytes, holding, settings.body_timeout_s
        )
        if encoding is not None:
            # Held before inflating: deflate expands at most ~1032:1, and the upload limit caps it.
            compressed = holding.bytes
            bound = min(settings.max_upload_bytes + 1, DEFLATE_MAX_RATIO * len(body))
            holding.grow(bound, "decompressing the request body")
            body = await svc.in_pool(_inflate, body, encoding, settings.max_upload_bytes)
            holding.hold(compressed + len(body), "the decompressed request body")
        json_length = _header_length(request.headers.get(HEADER_LENGTH), len(body))
        if json_length > MAX_JSON_REQUEST_BYTES:
            raise errors.PayloadTooLargeError(
                f"the request's JSON part is {json_length} bytes, more than "
                f"{MAX_JSON_REQUEST_BYTES}: send the image as binary data (the binary tensor "
                "data extension, as Triton's clients do by default)"
            )
        holding.grow(JSON_PARSE_BYTES_PER_BYTE * json_length, "the parsed JSON request")
        inference, binary = await svc.in_pool(_split_body, body, json_length)
        del body
        outputs = _requested_outputs(inference)
        options = _segment_options(inference.parameters or {}, PROBABILITIES_OUTPUT in outputs)
        binary_default = _flag(inference.parameters or {}, BINARY_OUTPUT_PARAMETER, False)
        received = time.perf_counter()

        async def decode_and_run(
            inputs: list[RequestInput], binary: bytes
        ) -> tuple[SegmentResult, float]:
            image = await svc.in_pool(_input_image, inputs, binary, settings.max_pixels)
            del inputs, binary
            holding.hold(image.nbytes, "the decoded image")
            decoded = time.perf_counter()
            STAGE_LATENCY.labels(engine.name, "decode").observe(decoded - received)
            plan = engine.plan(options, *image.shape[:2])
            meta = engine.bundle.metadata
            _check_json_size(outputs, binary_default, meta.num_classes, plan.height * plan.width)
            holding.hold(request_bytes(plan, meta.num_classes, meta.output.stride), "this request")
            return await engine.run(image, plan), time.perf_counter()

        work = decode_and_run(inference.inputs, binary)
        del binary  # held by the coroutine until decoded
        inference.inputs = []
        result, finished = await until_disconnect(request, work)
        answer, header_length = await svc.in_pool(
            _encode_outputs, engine, result, outputs, binary_default, inference.id
        )
        STAGE_LATENCY.labels(engine.name, "encode").observe(time.perf_counter() - finished)
        if header_length is None:
            return Response(answer, media_type="application/json")
        return Response(
            memoryview(answer),
            media_type="application/octet-stream",
            headers={HEADER_LENGTH: str(header_length)},
        )


def _labels_datatype(engine: Engine) -> str:
    return "UINT8" if labels_dtype(engine.bundle.metadata.num_classes) is np.uint8 else "UINT16"


def _malformed(message: str) -> errors.MalformedRequestError:
    return errors.MalformedRequestError(f"malformed inference request: {message}")


DEFLATE_MAX_RATIO = 1032  # deflate's largest expansion (RFC 1951 blocks of repeated bytes)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A compressed request body, inflated to at most ``limit`` bytes (the upload limit)."""
    inflater = zlib.decompressobj(REQUEST_ENCODINGS[encoding])
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _malformed(f"the {encoding} body does not decompress: {exc}") from None
    if len(inflated) > limit:
        raise errors.PayloadTooLargeError(
            f"the {encoding} request body inflates past the limit of {limit} bytes"
        )
    if not inflater.eof or inflater.unused_data:
        raise _malformed(f"the {encoding} body is cut short or has bytes after its end")
    return inflated


def _header_length(value: str | None, body_length: int) -> int:
    """Bytes of JSON before the binary tensor data (Triton's extension): all of them without
    the header. Digits only: ``str.isdigit`` also takes "²", which ``int`` refuses."""
    if value is None:
        return body_length
    if not (value.isascii() and value.isdigit()) or int(value) > body_length:
        raise _malformed(f"{HEADER_LENGTH} is {value!r} for a body of {body_length} bytes")
    return int(value)


def _flag(parameters: Parameters, name: str, default: bool) -> bool:
    """A boolean parameter: JSON true or false only (the string "false" is not false)."""
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise errors.InvalidParameterError(
            f"parameter {name!r} must be true or false, got {value!r}"
        )
    return value


def _split_body(body: bytes, header_length: int) -> tuple[InferRequest, bytes]:
    """The JSON request and the binary tensor data after it (Triton's extension)."""
    header, binary = body[:header_length], body[header_length:]
    try:
        return InferRequest.model_validate_json(header), binary
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise _malformed(problems) from None


def _requested_outputs(inference: InferRequest) -> dict[str, Parameters]:
    """Output name -> its parameters; ``labels`` alone when the request names none."""
    if not inference.outputs:
        return {LABELS_OUTPUT: {}}
    known = (LABELS_OUTPUT, PROBABILITIES_OUTPUT)
    unknown = [o.name for o in inference.outputs if o.name not in known]
    if unknown:
        raise errors.InvalidParameterError(f"unknown outputs {unknown}; this model has {known}")
    for output in inference.outputs:
        _known_parameters(f"output {output.name!r}", output.parameters, OUTPUT_PARAMETERS)
    return {o.name: o.parameters or {} for o in inference.outputs}


def _known_parameters(what: str, parameters: Parameters | None, known: tuple[str, ...]) -> None:
    unknown = sorted(set(parameters or {}) - set(known))
    if unknown:
        hint = (
            " (classification is not served: the labels output is each pixel's class)"
            if "classification" in unknown
            else ""
        )
        raise errors.InvalidParameterError(
            f"{what}: unknown parameters {unknown}; known: {list(known)}{hint}"
        )


def _segment_options(parameters: Parameters, probabilities: bool) -> SegmentOptions:
    """Request parameters -> the options ``/segment`` takes (checked by the same planning)."""
    unknown = sorted(set(parameters) - {*OPTION_PARAMETERS, BINARY_OUTPUT_PARAMETER})
    if unknown:
        raise errors.InvalidParameterError(
            f"unknown parameters {unknown}; known: {[*OPTION_PARAMETERS, BINARY_OUTPUT_PARAMETER]}"
        )

    def text(key: str) -> str | None:
        value = parameters.get(key)
        if value is None or isinstance(value, bool):
            if value is not None:
                raise errors.InvalidParameterError(f"parameter {key} must not be a boolean")
            return None
        return str(value)

    mode = text("mode")
    if mode not in (None, "whole", "slide"):
        raise errors.InvalidParameterError(f"mode must be 'whole' or 'slide', got {mode!r}")
    flip = parameters.get("flip", False)
    if not isinstance(flip, bool):
        raise errors.InvalidParameterError(f"parameter flip must be a boolean, got {flip!r}")
    return SegmentOptions(
        mode=mode,  # type: ignore[arg-type]
        scales=parse_scales(text("scales")),
        flip=flip,
        crop=parse_size("crop", text("crop")),
        stride=parse_size("stride", text("stride")),
        return_probabilities=probabilities,
    )


def _input_image(inputs: list[RequestInput], binary: bytes, max_pixels: int) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image of the one input: decoded from ``image`` (BYTES), or
    ``pixels`` (UINT8 H x W x 3) as sent."""
    if len(inputs) != 1:
        raise errors.InvalidParameterError(
            f"send exactly one input ({ENCODED_INPUT!r} or {PIXELS_INPUT!r}), got {len(inputs)}"
        )
    tensor = inputs[0]
    _known_parameters(f"input {tensor.name!r}", tensor.parameters, INPUT_PARAMETERS)
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise _malformed(f"binary_data_size must be a byte count, got {size!r}")
    if size is not None and size != len(binary):
        raise _malformed(f"binary_data_size is {size} but {len(binary)} bytes follow the header")
    if size is None and binary:
        raise _malformed(f"{len(binary)} bytes follow the header but no input has binary data")
    if size is not None and tensor.data is not None:
        raise _malformed(f"input {tensor.name!r} has both binary data and JSON data")
    if tensor.name == ENCODED_INPUT:
        if (
            tensor.datatype != "BYTES"
            or math.prod(tensor.shape) != 1
            or min(tensor.shape, default=1) < 1
        ):
            raise errors.InvalidParameterError(
                f"input {ENCODED_INPUT!r} is one BYTES element (the encoded image), got "
                f"{tensor.datatype} {tensor.shape}"
            )
        if size is None:
            raise errors.InvalidParameterError(
                f"send input {ENCODED_INPUT!r} as binary data (the binary tensor data extension)"
            )
        if len(binary) < 4 or int.from_bytes(binary[:4], "little") != len(binary) - 4:
            raise _malformed(
                "a BYTES element is a 4-byte little-endian length and that many bytes; "
                f"{len(binary)} bytes do not hold one"
            )
        return decode_image(binary[4:], max_pixels)
    if tensor.name != PIXELS_INPUT:
        raise errors.InvalidParameterError(
            f"unknown input {tensor.name!r}; this model takes {ENCODED_INPUT!r} or {PIXELS_INPUT!r}"
        )
    shape = tensor.shape
    if tensor.datatype != "UINT8" or len(shape) != 3 or shape[2] != 3 or min(shape) < 1:
        raise errors.InvalidParameterError(
            f"input {PIXELS_INPUT!r} is UINT8 [height, width, 3] RGB, got {tensor.datatype} {shape}"
        )
    if shape[0] * shape[1] > max_pixels:
        raise errors.PayloadTooLargeError(
            f"image has {shape[0] * shape[1]} pixels, the limit is {max_pixels}"
        )
    if size is not None:
        if size != math.prod(shape):
            raise _malformed(f"{size} binary bytes for a UINT8 {shape} tensor")
        return np.frombuffer(binary, np.uint8).reshape(shape)
    try:
        values = np.asarray(tensor.data if tensor.data is not None else [])
    except ValueError:  # nested lists of uneven lengths
        values = np.asarray([])
    if values.size != math.prod(shape) or not np.issubdtype(values.dtype, np.integer):
        raise errors.InvalidParameterError(
            f"input {PIXELS_INPUT!r} data must be {math.prod(shape)} integers"
        )
    if values.size and (values.min() < 0 or values.max() > 255):
        raise errors.InvalidParameterError(f"input {PIXELS_INPUT!r} data must be in 0..255")
    return values.astype(np.uint8).reshape(shape)


def _check_json_size(
    outputs: dict[str, Parameters], binary_default: bool, num_classes: int, pixels: int
) -> None:
    """Refuse, before inference, outputs too large to send as JSON numbers."""
    for name, parameters in outputs.items():
        elements = pixels * (num_classes if name == PROBABILITIES_OUTPUT else 1)
        if not _flag(parameters, "binary_data", binary_default) and elements > MAX_JSON_ELEMENTS:
            raise errors.PayloadTooLargeError(
                f"output {name!r} has {elements} elements, more than {MAX_JSON_ELEMENTS} as JSON: "
                "ask for it as binary data (output parameter binary_data: true)"
            )


def _encode_outputs(
    engine: Engine,
    result: SegmentResult,
    outputs: dict[str, Parameters],
    binary_default: bool,
    request_id: str | None,
) -> tuple[bytes | bytearray, int | None]:
    """The response body, and the length of its JSON header when binary tensors follow it.

    Binary tensors (little-endian, row-major) are converted straight into the body's buffer, so
    float16 probabilities add half their float32 planes, as ``/segment``'s ``.npy`` does."""
    tensors: list[tuple[str, np.ndarray, np.dtype]] = []
    for name in outputs:
        if name == LABELS_OUTPUT:
            tensors.append((name, result.labels, result.labels.dtype.newbyteorder("<")))
        else:
            assert result.probabilities is not None
            tensors.append((name, result.probabilities, np.dtype("<f2")))
    described = []
    binary_tensors = []
    for name, values, dtype in tensors:
        datatype = "FP16" if dtype.kind == "f" else _labels_datatype(engine)
        output = ResponseOutput(name=name, shape=list(values.shape), datatype=datatype)
        if _flag(outputs[name], "binary_data", binary_default):
            output.parameters = {"binary_data_size": values.size * dtype.itemsize}
            binary_tensors.append((values, dtype))
            described.append(output.model_dump(exclude_none=True))
        else:
            entry = output.model_dump(exclude_none=True)
            entry["data"] = values.astype(dtype, copy=False).ravel().tolist()  # not validated
            described.append(entry)
    response: dict[str, Any] = {"model_name": engine.name, "outputs": described}
    if request_id is not None:
        response["id"] = request_id
    header = json.dumps(response, separators=(",", ":")).encode()
    if not binary_tensors:
        return header, None
    body = bytearray(len(header) + sum(v.size * d.itemsize for v, d in binary_tensors))
    body[: len(header)] = header
    offset = len(header)
    for values, dtype in binary_tensors:
        target = np.frombuffer(body, dtype, count=values.size, offset=offset).reshape(values.shape)
        np.copyto(target, values, casting="same_kind")
        offset += values.size * dtype.itemsize
    return body, len(header)

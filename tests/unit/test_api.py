"""The FastAPI app in-process (real engines on the tiny bundles, real memory store): results match
the plain mmseg reference, every rendering decodes to the same labels, and every bad input is the
right status with a JSON error and no stack trace."""

from __future__ import annotations

import io
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.bundle import load_bundle
from service.http import create_app
from service.imageio import decode_image
from service.render import blend_overlay, palette_array
from service.settings import Settings
from tests.reference import ReferenceConfig, onnx_forward, reference_segment

AGREEMENT = 0.999
MAX_UPLOAD = 2_000_000
MAX_PIXELS = 400_000


def make_client(repository: Path, **overrides: object) -> TestClient:
    defaults: dict[str, object] = {
        "providers": ("cpu",),
        "max_upload_bytes": MAX_UPLOAD,
        "max_pixels": MAX_PIXELS,
        "max_scales": 4,
        "max_crop": 256,
        "intra_op_threads": 1,
        "worker_threads": 2,
    }
    settings = Settings(model_repository=repository, **{**defaults, **overrides})
    return TestClient(create_app(settings), raise_server_exceptions=False)


def wait_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(model_repository: Path) -> Iterator[TestClient]:
    with make_client(model_repository) as test_client:
        wait_ready(test_client)
        yield test_client


@pytest.fixture(scope="module")
def device_client(model_repository: Path) -> Iterator[TestClient]:
    """Post-processing as ONNX graphs on the (CPU) provider: ``SEGSERVE_POSTPROCESS=device``."""
    with make_client(model_repository, postprocess="device") as test_client:
        wait_ready(test_client)
        yield test_client


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode(payload: bytes) -> np.ndarray:
    array = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED)
    assert array is not None
    return cv2.cvtColor(array, cv2.COLOR_BGR2RGB) if array.ndim == 3 else array


@pytest.fixture(scope="module")
def chelsea(photos: dict[str, np.ndarray]) -> np.ndarray:
    return photos["chelsea"]  # 300x451


def post_image(client: TestClient, image: np.ndarray, **params: object):
    return client.post("/segment", params=params, files={"image": ("cat.png", png_bytes(image))})


def reference_labels(bundle_dir: Path, image: np.ndarray, **kw: object) -> np.ndarray:
    bundle = load_bundle(bundle_dir)
    config = bundle.metadata.test_config
    mode = kw.pop("mode", config.mode)
    crop = kw.pop("crop", config.crop)
    stride = kw.pop("stride", config.stride)
    reference = ReferenceConfig(mode, config.resize_scale, crop, stride)  # type: ignore[arg-type]
    labels, _ = reference_segment(onnx_forward(bundle), image, reference, **kw)  # type: ignore[arg-type]
    return labels


def test_segment_json_matches_the_reference_and_its_renderings(
    client: TestClient, chelsea: np.ndarray, model_repository: Path
) -> None:
    response = post_image(client, chelsea)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["model"] == "tiny" and result["trained"] is False
    assert (result["height"], result["width"]) == chelsea.shape[:2]
    assert result["num_inputs"] == 1
    assert {
        "decode",
        "preprocess",
        "queue_wait",
        "inference",
        "postprocess",
        "encode",
        "total",
    } <= set(result["timings"])
    assert "decode;dur=" in response.headers["server-timing"]

    labels = decode(client.get(result["urls"]["labels"]).content)
    assert labels.dtype == np.uint8 and labels.shape == chelsea.shape[:2]
    expected = reference_labels(model_repository / "tiny", chelsea)
    assert (labels == expected).mean() >= AGREEMENT

    ids, counts = np.unique(labels, return_counts=True)
    assert [c["id"] for c in result["classes"]] == ids.tolist()
    assert [c["pixels"] for c in result["classes"]] == counts.tolist()
    assert len(ids) >= 2  # a real photo through the tiny net gives several classes
    meta = load_bundle(model_repository / "tiny").metadata
    for entry in result["classes"]:
        assert entry["name"] == meta.classes[entry["id"]]
        assert tuple(entry["color"]) == meta.palette[entry["id"]]
        assert entry["fraction"] == pytest.approx(entry["pixels"] / labels.size)

    palette = np.asarray(meta.palette, np.uint8)
    colour = decode(client.get(result["urls"]["png"]).content)
    np.testing.assert_array_equal(colour, palette[labels])
    overlay = decode(client.get(result["urls"]["overlay"]).content).astype(int)
    exact = cv2.addWeighted(chelsea, 0.5, palette[labels], 0.5, 0).astype(int)
    # The store keeps the photo as JPEG (quality 90): the overlay differs by JPEG noise only.
    assert np.abs(overlay - exact).mean() < 2.0


@pytest.mark.parametrize("output", ["png", "labels", "overlay"])
def test_image_outputs_equal_the_stored_renderings(
    client: TestClient, chelsea: np.ndarray, output: str
) -> None:
    direct = post_image(client, chelsea, output=output)
    assert direct.status_code == 200 and direct.headers["content-type"] == "image/png"
    labels = decode(client.get(post_image(client, chelsea).json()["urls"]["labels"]).content)
    palette = np.asarray(load_palette(client), np.uint8)
    image = decode(direct.content)
    if output == "labels":
        np.testing.assert_array_equal(image, labels)
    elif output == "png":
        np.testing.assert_array_equal(image, palette[labels])
    else:
        expected = cv2.addWeighted(chelsea, 0.5, palette[labels], 0.5, 0)
        assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1


def load_palette(client: TestClient) -> list[list[int]]:
    return client.get("/models/tiny").json()["palette"]


def test_raw_body_equals_multipart(client: TestClient, chelsea: np.ndarray) -> None:
    raw = client.post(
        "/segment",
        params={"output": "labels"},
        content=png_bytes(chelsea),
        headers={"content-type": "image/png"},
    )
    multipart = post_image(client, chelsea, output="labels")
    assert raw.status_code == 200
    np.testing.assert_array_equal(decode(raw.content), decode(multipart.content))


@pytest.mark.parametrize(
    ("scales", "flip", "inputs_over"),
    [((0.5, 1.0), True, 4), (None, False, 1)],
    ids=["multiscale-flip", "labels-tile-wise"],
)
@pytest.mark.parametrize("postprocess", ["host", "device"])
def test_slide_matches_the_reference(
    request: pytest.FixtureRequest,
    postprocess: str,
    chelsea: np.ndarray,
    model_repository: Path,
    scales: tuple[float, ...] | None,
    flip: bool,
    inputs_over: int,
) -> None:
    """Slide with TTA averages full softmax planes; plain slide labels come tile by tile
    (``service.labelmap``). Both must give mmseg's labels, and so must the same steps as ONNX
    graphs (``postprocess=device``)."""
    client: TestClient = request.getfixturevalue(
        "client" if postprocess == "host" else "device_client"
    )
    assert client.get("/models/tiny-float").json()["postprocess"] == postprocess
    params = {"model": "tiny-float", "mode": "slide", "crop": "128", "stride": "96x80"}
    if scales is not None:
        params |= {"scales": ",".join(str(ratio) for ratio in scales), "flip": str(flip).lower()}
    params["output"] = "labels"
    response = client.post("/segment", params=params, files={"image": png_bytes(chelsea)})
    assert response.status_code == 200, response.text
    expected = reference_labels(
        model_repository / "tiny-float",
        chelsea,
        mode="slide",
        crop=(128, 128),
        stride=(96, 80),
        scales=scales,
        flip=flip,
    )
    assert (decode(response.content) == expected).mean() >= AGREEMENT
    counted = client.post(
        "/segment", params=params | {"output": "json"}, files={"image": png_bytes(chelsea)}
    )
    assert counted.json()["num_inputs"] > inputs_over  # several windows (x scales x flips)


def test_models_listing(client: TestClient, model_repository: Path) -> None:
    models = client.get("/models").json()
    assert [m["name"] for m in models] == ["tiny", "tiny-float"]
    tiny = client.get("/models/tiny").json()
    meta = load_bundle(model_repository / "tiny").metadata
    assert tiny["default"] is True and tiny["provider"] == "CPUExecutionProvider"
    assert tiny["postprocess"] == "host"  # auto on the CPU provider
    assert tiny["aligned_side"] == 0  # no upsampling in the tiny graph: no twin
    assert tiny["classes"] == list(meta.classes) and tiny["num_classes"] == 5
    assert tiny["test_config"]["mode"] == "whole" and tiny["trained"] is False
    assert client.get("/models/tiny-float").json()["test_config"]["crop"] == [96, 96]


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG")
    return buffer.getvalue()


def _bomb() -> bytes:
    """A few-kilobyte PNG whose header claims 20000 x 20000 pixels."""
    buffer = io.BytesIO()
    Image.new("L", (20000, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = (20000).to_bytes(4, "big") * 2  # IHDR width and height
    data[29:33] = zlib.crc32(data[12:29]).to_bytes(4, "big")  # IHDR's CRC, recomputed
    return bytes(data)


BAD_INPUTS = [
    # (description, request kwargs, query, status, error code)
    (
        "text body",
        {"content": b"hello", "headers": {"content-type": "text/plain"}},
        {},
        415,
        "unsupported_media",
    ),
    (
        "not an image",
        {"files": {"image": ("a.bin", b"%PDF-1.4 ...")}},
        {},
        415,
        "unsupported_media",
    ),
    ("empty image", {"files": {"image": ("a.png", b"")}}, {}, 400, "invalid_image"),
    ("no image field", {"files": {"photo": ("a.png", b"x")}}, {}, 400, "invalid_image"),
    (
        "multipart without boundary",
        {"content": b"xx", "headers": {"content-type": "multipart/form-data"}},
        {},
        400,
        "invalid_image",
    ),
    (
        "garbled multipart",
        {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=b"}},
        {},
        400,
        "invalid_image",
    ),
    ("truncated", {"files": {"image": ("a.jpg", "TRUNCATED")}}, {}, 400, "invalid_image"),
    (
        "corrupt",
        {"files": {"image": ("a.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)}},
        {},
        400,
        "invalid_image",
    ),
    ("too many pixels", {"files": {"image": ("a.png", "BIG")}}, {}, 413, "payload_too_large"),
    ("bomb", {"files": {"image": ("a.png", "BOMB")}}, {}, 413, "payload_too_large"),
    (  # refused by its Content-Type before the body is read (it was a 413 after reading it)
        "wrong content type, body over limit",
        {"content": b"x" * (MAX_UPLOAD + 1), "headers": {"content-type": "text/plain"}},
        {},
        415,
        "unsupported_media",
    ),
    (
        "body over limit",
        {
            "content": b"\xff\xd8\xff" + b"\x00" * MAX_UPLOAD,
            "headers": {"content-type": "image/jpeg"},
        },
        {},
        413,
        "payload_too_large",
    ),
    (
        "unknown model",
        {"files": {"image": ("a.png", "OK")}},
        {"model": "nope"},
        404,
        "unknown_model",
    ),
    (
        "zero stride",
        {"files": {"image": ("a.png", "OK")}},
        {"mode": "slide", "stride": "0"},
        422,
        "invalid_parameter",
    ),
    (
        "bad stride",
        {"files": {"image": ("a.png", "OK")}},
        {"stride": "12xq"},
        422,
        "invalid_parameter",
    ),
    (
        "crop too large",
        {"files": {"image": ("a.png", "OK")}},
        {"mode": "slide", "crop": "257"},
        422,
        "invalid_parameter",
    ),
    (
        "too many scales",
        {"files": {"image": ("a.png", "OK")}},
        {"scales": "1,1,1,1,1"},
        422,
        "invalid_parameter",
    ),
    (
        "negative scale",
        {"files": {"image": ("a.png", "OK")}},
        {"scales": "1,-0.5"},
        422,
        "invalid_parameter",
    ),
    (
        "nan scale",
        {"files": {"image": ("a.png", "OK")}},
        {"scales": "nan"},
        422,
        "invalid_parameter",
    ),
    (
        "bad mode",
        {"files": {"image": ("a.png", "OK")}},
        {"mode": "tiles"},
        422,
        "invalid_parameter",
    ),
    (
        "a window per pixel",  # 300x451 crops of 1 px: refused before any window is listed
        {"files": {"image": ("a.png", "OK")}},
        {"mode": "slide", "crop": "1", "stride": "1", "scales": "1,2", "flip": "true"},
        422,
        "invalid_parameter",
    ),
    (
        "bad output",
        {"files": {"image": ("a.png", "OK")}},
        {"output": "gif"},
        422,
        "invalid_parameter",
    ),
    (
        "unknown query",
        {"files": {"image": ("a.png", "OK")}},
        {"colour": "red"},
        422,
        "invalid_parameter",
    ),
    (
        "repeated scales",  # how httpx, requests and URLSearchParams send a list: was 1.25 alone
        {"files": {"image": ("a.png", "OK")}},
        {"scales": ["0.75", "1.25"]},
        422,
        "invalid_parameter",
    ),
    (
        "repeated flip",
        {"files": {"image": ("a.png", "OK")}},
        {"flip": ["true", "false"]},
        422,
        "invalid_parameter",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "query", "status", "code"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_gets_status_and_json_error(
    client: TestClient,
    chelsea: np.ndarray,
    kwargs: dict,
    query: dict,
    status: int,
    code: str,
) -> None:
    substitutes = {
        "OK": png_bytes(chelsea),
        "TRUNCATED": _jpeg(chelsea)[:3000],
        "BIG": png_bytes(np.zeros((700, 700, 3), np.uint8)),  # 490000 > MAX_PIXELS
        "BOMB": _bomb(),
    }
    if "files" in kwargs:
        kwargs = {
            "files": {
                field: (name, substitutes.get(body, body) if isinstance(body, str) else body)
                for field, (name, body) in kwargs["files"].items()
            }
        }
    response = client.post("/segment", params=query, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["message"]
    assert "Traceback" not in response.text
    # ... and the server keeps serving.
    assert post_image(client, chelsea, output="labels").status_code == 200


def test_unknown_mask_is_404(client: TestClient) -> None:
    for path in ("/masks/{}.png", "/masks/{}/labels.png", "/masks/{}/overlay.png"):
        response = client.get(path.format("AAAAAAAAAAAAAAAAAAAAAA"))
        assert response.status_code == 404 and response.json()["error"] == "mask_not_found"
    assert client.get("/models/nope").json()["error"] == "unknown_model"


def test_unexpected_failure_is_a_500_without_details(
    client: TestClient, chelsea: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = client.app.state.services.manager.get("tiny")  # type: ignore[attr-defined]

    async def broken(*args: object) -> None:
        raise RuntimeError("secret internal detail /etc/passwd")

    monkeypatch.setattr(engine, "run", broken)
    response = post_image(client, chelsea)
    assert response.status_code == 500
    assert response.json() == {
        "error": "internal",
        "message": "internal server error (see the server log)",
    }
    assert "secret" not in response.text


def test_draining_refuses_segment_and_readyz(client: TestClient, chelsea: np.ndarray) -> None:
    lifecycle = client.app.state.services.lifecycle  # type: ignore[attr-defined]
    lifecycle.begin_drain()
    try:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        refused = post_image(client, chelsea)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == "overloaded"
        assert client.get("/healthz").status_code == 200
    finally:
        lifecycle.draining = False


def test_api_key_guards_segment_and_masks_only(model_repository: Path, chelsea: np.ndarray) -> None:
    with make_client(model_repository, api_key="s3cret-key") as keyed:
        wait_ready(keyed)
        assert post_image(keyed, chelsea).status_code == 401
        wrong = keyed.post(
            "/segment", files={"image": png_bytes(chelsea)}, headers={"x-api-key": "s3cret-kez"}
        )
        assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
        ok = keyed.post(
            "/segment", files={"image": png_bytes(chelsea)}, headers={"x-api-key": "s3cret-key"}
        )
        assert ok.status_code == 200
        url = ok.json()["urls"]["png"]
        assert keyed.get(url).status_code == 401
        assert keyed.get(url, headers={"authorization": "Bearer s3cret-key"}).status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics", "/models", "/"):
            assert keyed.get(open_path).status_code == 200, open_path


def test_inference_over_the_time_limit_is_504(model_repository: Path, chelsea: np.ndarray) -> None:
    with make_client(model_repository, inference_timeout_s=1e-6) as slow:
        wait_ready(slow)
        response = post_image(slow, chelsea)
        assert response.status_code == 504 and response.json()["error"] == "inference_timeout"


def test_default_model_setting(model_repository: Path, chelsea: np.ndarray) -> None:
    with make_client(model_repository, default_model="tiny-float") as other:
        wait_ready(other)
        assert post_image(other, chelsea).json()["model"] == "tiny-float"
        assert [m["name"] for m in other.get("/models").json() if m["default"]] == ["tiny-float"]


def test_unknown_default_model_keeps_the_server_unready(model_repository: Path) -> None:
    with make_client(model_repository, default_model="missing") as broken:
        deadline = time.monotonic() + 30
        while "models are loading" in (problems := broken.get("/readyz").json()["problems"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert broken.get("/readyz").status_code == 503
        assert len(problems) == 1 and "'missing'" in problems[0]
        refused = broken.post("/segment", content=b"x", headers={"content-type": "image/png"})
        assert refused.status_code == 503 and "'missing'" in refused.json()["message"]


def _encoded(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_colour_modes_and_orientation_reach_the_model_as_upright_rgb(
    client: TestClient, chelsea: np.ndarray
) -> None:
    """Each variant decodes to exactly the upright RGB photo: its labels equal the PNG's."""
    upright = Image.fromarray(chelsea)
    stored_rotated = Image.fromarray(np.ascontiguousarray(np.rot90(chelsea, 1)))
    exif = stored_rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": undoes the rot90 above
    alpha = Image.fromarray(np.dstack([chelsea, np.full(chelsea.shape[:2], 40, np.uint8)]))
    variants = {
        "rgba": _encoded(alpha, "PNG"),
        "exif-rotated": _encoded(stored_rotated, "PNG", exif=exif),
        "tiff": _encoded(upright, "TIFF"),
        "webp-lossless": _encoded(upright, "WEBP", lossless=True),
        # x265 lossless, 4:4:4, identity matrix: exact RGB; the rotation as HEIF's irot
        "heic-rotated": _encoded(
            stored_rotated,
            "HEIF",
            quality=-1,
            chroma=444,
            matrix_coefficients=0,
            exif=exif.tobytes(),
        ),
    }

    def labels_of(payload: bytes) -> np.ndarray:
        response = client.post("/segment", params={"output": "labels"}, files={"image": payload})
        assert response.status_code == 200, response.text
        return decode(response.content)

    expected = labels_of(png_bytes(chelsea))
    for name, payload in variants.items():
        np.testing.assert_array_equal(labels_of(payload), expected, err_msg=name)
    grey = chelsea.mean(axis=2).round().astype(np.uint8)
    grey16 = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit grey whose high byte is grey
    np.testing.assert_array_equal(
        labels_of(_encoded(grey16, "PNG")), labels_of(png_bytes(np.dstack([grey] * 3)))
    )


def test_a_jpeg_upload_is_kept_as_the_overlay_photo(
    client: TestClient, model_repository: Path, chelsea: np.ndarray
) -> None:
    """The store keeps a JPEG upload as it came instead of re-encoding it: the overlay blends
    exactly the pixels the model saw, upright even when the JPEG is rotated by EXIF."""
    stored_rotated = Image.fromarray(np.ascontiguousarray(np.rot90(chelsea, 1)))
    exif = stored_rotated.getexif()
    exif[0x0112] = 6
    upload = _encoded(stored_rotated, "JPEG", quality=80, exif=exif)
    response = client.post("/segment", files={"image": ("cat.jpg", upload)})
    assert response.status_code == 200, response.text
    urls = response.json()["urls"]
    labels = decode(client.get(urls["labels"]).content)
    assert labels.shape == chelsea.shape[:2]
    overlay = decode(client.get(urls["overlay"]).content)
    palette = palette_array(load_bundle(model_repository / "tiny").metadata.palette)
    expected = blend_overlay(labels, decode_image(upload, 10**8), palette)
    np.testing.assert_array_equal(overlay, expected)


def test_a_strip_longer_than_jpeg_allows_is_kept_losslessly(
    model_repository: Path, chelsea: np.ndarray
) -> None:
    """A side over libjpeg's 65 500 px is within the pixel limit but not JPEG's: re-encoding
    the upload as JPEG for the store was a 500. The store keeps it as PNG: the overlay blends
    exactly the uploaded pixels."""
    strip = np.tile(chelsea[:128], (1, 146, 1))[:, :65_600]  # 128 rows: the test resize keeps 1
    with make_client(model_repository, max_pixels=strip.size) as client:
        wait_ready(client)
        response = client.post("/segment", files={"image": ("strip.png", png_bytes(strip))})
        assert response.status_code == 200, response.text
        assert (response.json()["width"], response.json()["height"]) == (65_600, 128)
        urls = response.json()["urls"]
        labels = decode(client.get(urls["labels"]).content)
        overlay = decode(client.get(urls["overlay"]).content)
    palette = palette_array(load_bundle(model_repository / "tiny").metadata.palette)
    np.testing.assert_array_equal(overlay, blend_overlay(labels, strip, palette))


def test_a_multipart_body_cut_short_is_named_as_such(
    client: TestClient, chelsea: np.ndarray
) -> None:
    """A form cut before its closing boundary parses to no fields: it was answered as if the
    client had sent no 'image' field. (A form that is complete but lacks it still says that.)"""
    form = httpx.Request("POST", "http://x/segment", files={"image": ("c.png", png_bytes(chelsea))})
    body = form.read()
    headers = {"content-type": form.headers["content-type"]}
    cut = client.post("/segment", content=body[: len(body) // 2], headers=headers)
    assert cut.status_code == 400
    assert "ends before its closing boundary" in cut.json()["message"]
    other = httpx.Request("POST", "http://x/segment", files={"photo": ("c.png", b"x")})
    wrong = client.post(
        "/segment", content=other.read(), headers={"content-type": other.headers["content-type"]}
    )
    assert wrong.status_code == 400
    assert "no file field named 'image'" in wrong.json()["message"]


def test_options_sent_as_form_fields_are_refused_by_name(
    client: TestClient, chelsea: np.ndarray
) -> None:
    """``curl -F image=@a.png -F model=tiny-float`` was answered by the default model, the field
    silently ignored: options are read from the query string only."""
    files = {"image": ("c.png", png_bytes(chelsea))}
    refused = client.post("/segment", files=files, data={"model": "tiny-float", "flip": "true"})
    assert refused.status_code == 422
    assert refused.json()["error"] == "invalid_parameter"
    assert "not read: flip, model; options go in the query string" in refused.json()["message"]
    assert client.post("/segment", files=files, params={"model": "tiny-float"}).status_code == 200

"""The web page in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright):
pick or drop a photo, choose options, see the overlay, the mask and the legend, and errors."""

from __future__ import annotations

import base64
import contextlib
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, FileChooser, Page, Route, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from service.bundle import load_bundle
from tests.servers import SegserveServer, start_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SegserveServer]:
    yield from start_server(model_repository, tmp_path_factory.mktemp("page"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert shutil.which(CHROMIUM), "chromium missing: scripts/system_packages.sh installs it"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, server: SegserveServer) -> Iterator[Page]:
    context = browser.new_context()
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(str(error)))
    tab.goto(server.url + "/")
    tab.wait_for_function("document.querySelectorAll('#model option').length === 2")
    yield tab
    context.close()
    assert not problems, problems


def png_file(image: np.ndarray, path: Path) -> Path:
    Image.fromarray(image).save(path)
    return path


def shown_image(page: Page, selector: str) -> np.ndarray:
    """The pixels an <img> on the page shows (its blob fetched inside the page)."""
    encoded = page.evaluate(
        """async (selector) => {
            const blob = await (await fetch(document.querySelector(selector).src)).blob();
            const bytes = new Uint8Array(await blob.arrayBuffer());
            let text = "";
            for (const b of bytes) text += String.fromCharCode(b);
            return btoa(text);
        }""",
        selector,
    )
    bgr = cv2.imdecode(np.frombuffer(base64.b64decode(encoded), np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def mask_id(page: Page) -> str:
    return page.text_content("#status").removeprefix("done: mask ").strip()  # type: ignore[union-attr]


def check_results(page: Page, server: SegserveServer, model_dir: Path, photo: np.ndarray) -> None:
    """Overlay, mask and legend on the page equal what the API stored for the page's mask."""
    labels_png = httpx.get(f"{server.url}/masks/{mask_id(page)}/labels.png").content
    labels = cv2.imdecode(np.frombuffer(labels_png, np.uint8), cv2.IMREAD_UNCHANGED)
    meta = load_bundle(model_dir).metadata
    palette = np.asarray(meta.palette, np.uint8)
    np.testing.assert_array_equal(shown_image(page, "#mask"), palette[labels])
    overlay = shown_image(page, "#overlay")
    assert overlay.shape == photo.shape
    expected = cv2.addWeighted(photo, 0.5, palette[labels], 0.5, 0)
    assert np.abs(overlay.astype(int) - expected.astype(int)).mean() < 2.0

    rows = page.query_selector_all("#legend tbody tr")
    ids, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    shown_ids = [int(row.get_attribute("data-class-id") or -1) for row in rows]
    assert sorted(shown_ids) == ids.tolist()
    assert shown_ids[0] == ids[order[0]]  # the largest class first
    for row in rows:
        cells = [cell.inner_text() for cell in row.query_selector_all("td")]
        class_id = int(cells[2])
        assert cells[1] == meta.classes[class_id]
        share = counts[ids.tolist().index(class_id)] / labels.size
        assert cells[3] == f"{100 * share:.1f}%"
        swatch = row.query_selector(".swatch")
        assert swatch is not None
        colour = swatch.evaluate("e => getComputedStyle(e).backgroundColor")
        assert colour == "rgb({}, {}, {})".format(*meta.palette[class_id])
    assert page.is_visible("#untrained")  # random-weight bundles say so


def test_pick_a_photo_and_see_overlay_mask_legend(
    page: Page,
    server: SegserveServer,
    photos: dict[str, np.ndarray],
    model_repository: Path,
    tmp_path: Path,
) -> None:
    photo = photos["chelsea"]
    assert page.is_disabled("#run")
    page.set_input_files("#file", png_file(photo, tmp_path / "cat.png"))
    # The preview has no size until the browser has decoded the photo, so wait for it.
    page.wait_for_selector("#preview", state="visible", timeout=30_000)
    shown = page.eval_on_selector("#preview", "e => [e.naturalWidth, e.naturalHeight]")
    assert shown == [photo.shape[1], photo.shape[0]]
    page.click("#run")
    page.wait_for_selector("#results", state="visible", timeout=30_000)
    assert page.is_hidden("#error")
    check_results(page, server, model_repository / "tiny", photo)


def test_drop_a_photo_with_slide_options(
    page: Page, server: SegserveServer, photos: dict[str, np.ndarray], model_repository: Path
) -> None:
    photo = photos["coffee"][::2, ::2].copy()
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    transfer = page.evaluate_handle(
        """(encoded) => {
            const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "coffee.png", { type: "image/png" }));
            return transfer;
        }""",
        base64.b64encode(buffer.getvalue()).decode(),
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    assert page.is_enabled("#run")
    page.select_option("#model", "tiny-float")
    page.select_option("#mode", "slide")
    page.fill("#crop", "96")
    page.fill("#stride", "64")
    page.check("#flip")
    with page.expect_request(lambda r: "/segment?" in r.url) as request:
        page.click("#run")
    query = request.value.url
    for part in ("model=tiny-float", "mode=slide", "crop=96", "stride=64", "flip=true"):
        assert part in query
    page.wait_for_selector("#results", state="visible", timeout=30_000)
    check_results(page, server, model_repository / "tiny-float", photo)
    assert "model input(s)" in (page.text_content("#timing") or "")


def test_errors_are_shown(page: Page, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    page.set_input_files("#file", text)
    page.click("#run")
    page.wait_for_selector("#error", state="visible", timeout=30_000)
    assert (page.text_content("#error") or "").startswith("415:")
    assert page.is_hidden("#results")
    page.fill("#scales", "0")
    page.set_input_files("#file", {"name": "x.png", "mimeType": "image/png", "buffer": b"\x89PNG"})
    page.click("#run")
    page.wait_for_function("document.querySelector('#error').textContent.startsWith('422:')")


@pytest.fixture(scope="module")
def keyed_server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SegserveServer]:
    yield from start_server(model_repository, tmp_path_factory.mktemp("page_key"), api_key="pg-key")


def test_api_key_field(
    browser: Browser, keyed_server: SegserveServer, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """Without the key the page shows the 401; with it, results (images fetched with the key)."""
    page = browser.new_page()
    page.goto(keyed_server.url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length === 2")
    photo = photos["rocket"][::2, ::2].copy()
    page.set_input_files("#file", png_file(photo, tmp_path / "r.png"))
    page.click("#run")
    page.wait_for_selector("#error", state="visible", timeout=30_000)
    assert (page.text_content("#error") or "").startswith("401:")
    page.fill("#apikey", "pg-key")
    page.click("#run")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('done')")
    assert page.is_hidden("#error")
    np.testing.assert_array_equal(shown_image(page, "#overlay").shape, photo.shape)
    page.close()


def test_hover_opacity_and_downloads(
    page: Page,
    server: SegserveServer,
    photos: dict[str, np.ndarray],
    model_repository: Path,
    tmp_path: Path,
) -> None:
    """The class under the cursor is the stored label there; the slider re-blends the overlay;
    every download link saves what the API serves for the mask (probabilities: a fresh .npy)."""
    photo = photos["astronaut"][::4, ::4].copy()  # 128x128
    page.set_input_files("#file", png_file(photo, tmp_path / "astronaut.png"))
    page.click("#run")
    page.wait_for_selector("#results", state="visible", timeout=30_000)
    mask = mask_id(page)
    labels = cv2.imdecode(
        np.frombuffer(httpx.get(f"{server.url}/masks/{mask}/labels.png").content, np.uint8),
        cv2.IMREAD_UNCHANGED,
    )
    meta = load_bundle(model_repository / "tiny").metadata

    scale = page.eval_on_selector("#overlay", "e => e.naturalWidth / e.clientWidth")
    rng = np.random.default_rng(5)
    for row, column in rng.integers(0, 128, (6, 2)).tolist():
        # The centre of pixel (row, column) in CSS pixels of the shown image.
        page.hover("#overlay", position={"x": (column + 0.5) / scale, "y": (row + 0.5) / scale})
        expected = int(labels[row, column])
        page.wait_for_function(
            "(id) => document.querySelector('#hover').dataset.classId === String(id)", arg=expected
        )
        assert (page.text_content("#hover") or "").startswith(f"{meta.classes[expected]} ")
        hovered = page.query_selector("#legend tr.hovered")
        assert hovered is not None and hovered.get_attribute("data-class-id") == str(expected)

    before = page.get_attribute("#overlay", "src")
    page.eval_on_selector(
        "#opacity", "e => { e.value = 20; e.dispatchEvent(new Event('change')); }"
    )
    page.wait_for_function("(old) => document.querySelector('#overlay').src !== old", arg=before)
    page.wait_for_function("document.querySelector('#overlay').complete")
    shown = shown_image(page, "#overlay")
    served = httpx.get(f"{server.url}/masks/{mask}/overlay.png?opacity=0.2").content
    served_rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(served, np.uint8), 1), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(shown, served_rgb)
    colours = np.asarray(meta.palette, np.uint8)[labels]

    def distance(opacity: float) -> float:  # to the blend of the uploaded (not JPEG'd) photo
        blend = cv2.addWeighted(photo, 1 - opacity, colours, opacity, 0)
        return float(np.abs(shown.astype(int) - blend.astype(int)).mean())

    assert distance(0.2) < 5 and distance(0.2) < distance(0.5) / 2

    urls = {
        "png": f"/masks/{mask}.png",
        "labels": f"/masks/{mask}/labels.png",
        "overlay": f"/masks/{mask}/overlay.png?opacity=0.2",
        "rle": f"/masks/{mask}/rle.json",
        "polygons": f"/masks/{mask}/polygons.geojson",
    }
    for encoding in [*urls, "probabilities"]:
        with page.expect_download() as started:
            page.click(f"#downloads a[data-encoding={encoding}]")
        download = started.value
        assert download.suggested_filename.startswith(f"{mask}-{encoding}.")
        content = Path(download.path()).read_bytes()
        if encoding in urls:
            assert content == httpx.get(server.url + urls[encoding]).content, encoding
        else:
            probabilities = np.load(io.BytesIO(content))
            assert probabilities.shape == (len(meta.classes), *labels.shape)
            assert (probabilities.argmax(axis=0) == labels).mean() >= 0.999


def run_segment(page: Page) -> str:
    """Click Segment and wait for it to end; the status it ended with."""
    page.click("#run")
    page.wait_for_function(
        "/^(done|failed)/.test(document.querySelector('#status').textContent)", timeout=30_000
    )
    return page.text_content("#status") or ""


def natural_size(page: Page, selector: str) -> list[int]:
    return page.eval_on_selector(selector, "e => [e.naturalWidth, e.naturalHeight]")


def served_overlay(server: SegserveServer, mask: str, opacity: float) -> bytes:
    return httpx.get(f"{server.url}/masks/{mask}/overlay.png?opacity={opacity}").content


def overlay_bytes(page: Page) -> bytes:
    """The bytes of the overlay the page shows."""
    return bytes(
        page.evaluate(
            """async () => {
            const blob = await (await fetch(document.querySelector('#overlay').src)).blob();
            return [...new Uint8Array(await blob.arrayBuffer())];
        }"""
        )
    )


def set_opacity(page: Page, percent: int) -> None:
    page.eval_on_selector(
        "#opacity", "(e, v) => { e.value = v; e.dispatchEvent(new Event('change')); }", percent
    )


def wait_for_item(page: Page, items: list) -> None:
    """Wait for an event handler to have added to items (handlers run while Playwright waits)."""
    for _ in range(500):
        if items:
            return
        page.wait_for_timeout(20)
    raise AssertionError("the event did not come")


def test_no_stale_or_partial_result(
    page: Page, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """A new file hides the old result; a failed Segment (or a failed overlay fetch after it)
    shows none; the RLE failing only turns the class readout off, the rest is the new result."""
    first = photos["astronaut"][::8, ::8].copy()  # 64x64
    second = photos["coffee"][::8, ::8].copy()  # 50x75
    page.set_input_files("#file", png_file(first, tmp_path / "first.png"))
    assert run_segment(page).startswith("done")
    page.set_input_files("#file", png_file(second, tmp_path / "second.png"))
    assert page.is_hidden("#results")

    def busy(route: Route) -> None:
        route.fulfill(status=503, json={"error": "overloaded", "message": "busy"})

    page.route("**/overlay.png*", busy)
    assert run_segment(page) == "failed"
    assert page.text_content("#error") == "503: busy"
    assert page.is_hidden("#results")
    page.unroute("**/overlay.png*")

    page.route("**/rle.json", busy)
    assert run_segment(page).startswith("done")
    assert page.is_hidden("#error") and page.is_visible("#results")
    assert natural_size(page, "#overlay") == natural_size(page, "#mask") == [75, 50]
    assert (page.text_content("#timing") or "").startswith("75×50 px")
    assert page.text_content("#hover") == "no class readout (503: busy)"
    page.hover("#overlay")
    assert page.text_content("#hover") == "no class readout (503: busy)"

    page.set_input_files("#file", {"name": "x.txt", "mimeType": "text/plain", "buffer": b"text"})
    assert run_segment(page) == "failed"
    assert (page.text_content("#error") or "").startswith("415:")
    assert page.is_hidden("#results")


def test_late_overlays_never_replace_newer_ones(
    page: Page, server: SegserveServer, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """An overlay response held back until a newer one is shown (a later opacity, a new photo)
    is dropped, and replaced overlays release their object URLs."""
    page.set_input_files(
        "#file", png_file(photos["astronaut"][::8, ::8].copy(), tmp_path / "a.png")
    )
    assert run_segment(page).startswith("done")
    mask = mask_id(page)
    page.evaluate(
        """() => {
            window.liveUrls = new Set();
            const create = URL.createObjectURL, revoke = URL.revokeObjectURL;
            URL.createObjectURL = (blob) => {
                const url = create(blob);
                liveUrls.add(url);
                return url;
            };
            URL.revokeObjectURL = (url) => { liveUrls.delete(url); revoke(url); };
        }"""
    )
    held: list[Route] = []

    def hold(url: str) -> bool:  # this mask's overlays at 20% and 40%
        return mask in url and ("opacity=0.2" in url or "opacity=0.4" in url)

    page.route(hold, lambda route: held.append(route))
    set_opacity(page, 20)
    wait_for_item(page, held)
    for percent in (30, 70):
        before = page.get_attribute("#overlay", "src")
        set_opacity(page, percent)
        page.wait_for_function(
            "(old) => document.querySelector('#overlay').src !== old", arg=before
        )
    with contextlib.suppress(PlaywrightError):  # the page may have aborted it already
        held.pop().fulfill(body=served_overlay(server, mask, 0.2), content_type="image/png")
    page.wait_for_timeout(500)  # ample for a late 64x64 overlay to land
    assert overlay_bytes(page) == served_overlay(server, mask, 0.7)
    assert page.evaluate("liveUrls.size") == 1  # of those made since: the shown overlay's

    # An opacity change, then a new photo segmented before its overlay arrives.
    set_opacity(page, 40)
    wait_for_item(page, held)
    page.set_input_files("#file", png_file(photos["coffee"][::8, ::8].copy(), tmp_path / "c.png"))
    assert run_segment(page).startswith("done")
    with contextlib.suppress(PlaywrightError):
        held.pop().fulfill(body=served_overlay(server, mask, 0.4), content_type="image/png")
    page.wait_for_timeout(500)
    assert natural_size(page, "#overlay") == [75, 50]


def test_hover_edges_and_leave(
    page: Page, server: SegserveServer, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """The readout names the last row's and column's pixels (the overlay shown at a fractional
    size), and clears when the cursor leaves the image."""
    page.set_input_files(
        "#file", png_file(photos["astronaut"][::8, ::8].copy(), tmp_path / "a.png")
    )
    assert run_segment(page).startswith("done")
    labels_png = httpx.get(f"{server.url}/masks/{mask_id(page)}/labels.png").content
    labels = cv2.imdecode(np.frombuffer(labels_png, np.uint8), cv2.IMREAD_UNCHANGED)
    page.eval_on_selector("#overlay", "e => { e.style.width = '200.4px'; }")
    page.locator("#overlay").scroll_into_view_if_needed()
    box = page.locator("#overlay").bounding_box()
    assert box is not None
    edges = {  # (row, column) of the pixel: the cursor's (x, y) there
        (63, 12): (box["x"] + 40, box["y"] + box["height"] - 0.2),
        (30, 63): (box["x"] + box["width"] - 0.2, box["y"] + 95),
    }
    for (row, column), (x, y) in edges.items():
        # First a pixel of another class, so a readout left from it shows.
        other = np.argwhere(labels != labels[row, column])[0]
        scale = box["width"] / 64
        page.mouse.move(box["x"] + (other[1] + 0.5) * scale, box["y"] + (other[0] + 0.5) * scale)
        page.mouse.move(x, y)
        page.wait_for_function(
            "(text) => document.querySelector('#hover').textContent.endsWith(text)",
            arg=f"({labels[row, column]}) at {column}, {row}",
            timeout=5_000,
        )
    page.mouse.move(box["x"] + box["width"] + 20, box["y"] + 10)
    assert page.text_content("#hover") == ""
    assert page.query_selector("#legend tr.hovered") is None


def test_keyboard_picks_a_file(page: Page, photos: dict[str, np.ndarray], tmp_path: Path) -> None:
    """Tab reaches the file picker, its drop zone shows the focus, and Enter opens it."""
    choosers: list[FileChooser] = []
    # Listening early: Playwright starts intercepting choosers asynchronously.
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    for _ in range(3):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "file":
            break
    assert page.evaluate("document.activeElement.id") == "file"
    assert page.eval_on_selector("#drop", "e => getComputedStyle(e).outlineStyle") == "solid"
    page.keyboard.press("Enter")
    wait_for_item(page, choosers)
    choosers[0].set_files(png_file(photos["rocket"][::8, ::8].copy(), tmp_path / "r.png"))
    page.wait_for_selector("#preview", state="visible")
    assert page.is_enabled("#run")


def test_fits_a_phone_screen(page: Page) -> None:
    """A long model name does not widen the page past a 375 px screen."""
    page.set_viewport_size({"width": 375, "height": 800})
    page.eval_on_selector(
        "#model", "e => e.add(new Option('segformer-b5-cityscapes-1024x1024 (segformer, cuda)'))"
    )
    assert page.evaluate("document.documentElement.scrollWidth") <= 375


def test_page_icon_loads(page: Page) -> None:
    """The icon a browser loads for the page exists: without one, every page load logged a 404
    for /favicon.ico (when Chromium asks for it is not something a test can wait for)."""
    status = page.evaluate(
        """async () => {
            const link = document.querySelector("link[rel~='icon']");
            return (await fetch(link ? link.href : "/favicon.ico")).status;
        }"""
    )
    assert status == 200


def test_a_format_the_browser_cannot_show_is_still_segmented(
    page: Page, photos: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """A phone's HEIC (or a TIFF) is decoded by the server, not by Chromium: the preview says so
    instead of showing a broken image, and Segment works."""
    photo = photos["chelsea"][::4, ::4].copy()
    tiff = tmp_path / "scan.tiff"
    Image.fromarray(photo).save(tiff, format="TIFF")
    page.set_input_files("#file", tiff)
    page.wait_for_selector("#no-preview", state="visible", timeout=30_000)
    assert page.is_hidden("#preview")
    assert run_segment(page).startswith("done")
    assert natural_size(page, "#overlay") == [photo.shape[1], photo.shape[0]]
    page.set_input_files("#file", png_file(photo, tmp_path / "cat.png"))
    page.wait_for_selector("#preview", state="visible", timeout=30_000)
    assert page.is_hidden("#no-preview")

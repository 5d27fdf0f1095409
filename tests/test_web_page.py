"""The web page at GET / in a real browser: headless Chromium (Debian's chromium and
chromium-driver packages) driven by Selenium, against a server process with the default model.

What the page shows is checked against the server's own answers: the masks it draws against
/upload_rle, its click mask against /segment, its masks JSON byte for byte and its COCO file
through pycocotools. A screenshot after the upload is saved in test-artifacts/
(SAM2_TEST_ARTIFACTS to change it). What the page does with answers that come late, refused
or failed is checked with its requests answered in the page itself (stubbed_fetch), the
server's model left alone.

Without Chromium these tests are skipped, unless SAM2_REQUIRE_BROWSER=1 (as .ci/run sets it).
"""

import base64
import io
import json
import os
import shutil
import struct
import time
import urllib.request
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps, PngImagePlugin
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sam2serve.preprocess import decode_image

from .test_server import REPO, curl, start_server

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("SAM2_REQUIRE_BROWSER") == "1":
        raise RuntimeError("the browser tests need Debian's chromium and chromium-driver: "
                           "apt-get install -y chromium chromium-driver")
    pytest.skip("no chromium and chromedriver (apt-get install -y chromium chromium-driver)", allow_module_level=True)

from selenium import webdriver  # noqa: E402 (needs the browser check first)
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.actions import interaction  # noqa: E402
from selenium.webdriver.common.actions.action_builder import ActionBuilder  # noqa: E402
from selenium.webdriver.common.actions.pointer_input import PointerInput  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

EXAMPLE = REPO / "examples" / "shapes.jpg"
MAX_PIXELS = 1_000_000
ARTIFACTS = Path(os.environ.get("SAM2_TEST_ARTIFACTS", REPO / "test-artifacts"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The default model (no checkpoint arguments), as `make serve` runs it, on one torch thread:
    beside the browser on 2 busy cores (CI), two threads wait on each other and an upload of the
    example took 16 s instead of 2 (docs/performance.md, "Other work on the same cores")."""
    process, url = start_server("--threads", "1", log_path=tmp_path_factory.mktemp("logs") / "server.log",
                                max_pixels=MAX_PIXELS)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads, tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # No network here: Chromium's background connections are turned off rather than refused.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for get_log
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver
    driver.quit()


def page_state(driver, expression: str):
    return driver.execute_script(f"return window.sam2page.state.{expression}")


def wait_for(driver, condition, timeout: float = 120):
    # A dialog the page opens after async work (openMasks reads the file first) may not be open
    # yet at the first poll: switch_to.alert then raises, which is "not yet", not a failure.
    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoAlertPresentException,)).until(lambda d: condition(d))


def open_image(driver, path: Path) -> None:
    """Chooses a file as a person would, through the page's file input."""
    driver.find_element(By.ID, "file").send_keys(str(path))


def status(driver) -> str:
    return driver.find_element(By.ID, "status-text").text


@pytest.fixture(scope="module")
def uploaded(browser, server):
    """The page with the example image open and its masks drawn."""
    browser.get(server + "/")
    wait_for(browser, lambda d: "micro" in d.find_element(By.ID, "server-info").text)
    open_image(browser, EXAMPLE)
    wait_for(browser, lambda d: " masks in " in status(d))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web-page-upload.png"))
    return browser


def server_answer(url: str, path: Path, query: str = "") -> bytes:
    code, body = curl("-X", "POST", f"{url}/upload_rle{query}", "-F", f"image=@{path}")
    assert code == 200
    return body


def test_page_says_which_model_runs(browser, server):
    browser.get(server + "/")
    wait_for(browser, lambda d: "micro" in d.find_element(By.ID, "server-info").text)
    info = browser.find_element(By.ID, "server-info").text
    assert "mode ao" in info and "cpu" in info
    note = browser.find_element(By.ID, "weights-note")
    assert note.is_displayed() and "demo model" in note.text


def test_a_server_without_prompts_says_why_the_click_tool_is_off(browser, tmp_path):
    process, url = start_server("--fast", "--furious", log_path=tmp_path / "server.log")
    try:
        browser.get(url + "/")
        wait_for(browser, lambda d: "fast_furious" in d.find_element(By.ID, "server-info").text)
        radio = browser.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]")
        assert not radio.is_enabled()
        assert "not in mode fast_furious" in browser.find_element(By.ID, "tool").text  # on screen, not in a tooltip
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_every_mask_of_upload_rle_is_drawn(uploaded, server):
    answer = json.loads(server_answer(server, EXAMPLE))
    assert len(answer) >= 5  # the demo model finds the example's shapes
    assert page_state(uploaded, "annotations.length") == len(answer)
    assert len(uploaded.find_elements(By.CSS_SELECTOR, "#mask-list tbody tr")) == len(answer)
    # Each mask shows in the label map the canvas is drawn from (none hidden under others).
    shown = uploaded.execute_script("return [...new Set(window.sam2page.state.labels)].filter(v => v > 0).length")
    assert shown == len(answer)
    # The masks drawn are the server's, pixel for pixel.
    assert uploaded.execute_script("return window.sam2page.studyJson()") == json.dumps(answer, separators=(",", ":"))


def screen_offset(driver, x: float, y: float) -> tuple[int, int]:
    """An image pixel's offset from the canvas's centre on screen (ActionChains' frame)."""
    canvas = driver.find_element(By.ID, "highlight-canvas")
    width, height = page_state(driver, "width"), page_state(driver, "height")
    rect = canvas.rect
    return round((x + 0.5) * rect["width"] / width - rect["width"] / 2), round((y + 0.5) * rect["height"] / height - rect["height"] / 2)


def pixel_of_mask(driver, index: int) -> tuple[int, int]:
    """(x, y) of the mask's pixel on top nearest to the centroid of those pixels."""
    return driver.execute_script(
        "const s = window.sam2page.state; let x = 0, y = 0, n = 0;"
        "s.labels.forEach((label, p) => { if (label === arguments[0] + 1) { x += Math.floor(p / s.height); y += p % s.height; n++; } });"
        "x /= n; y /= n; let best = null, distance = Infinity;"
        "s.labels.forEach((label, p) => { const px = Math.floor(p / s.height), py = p % s.height;"
        "  const d = (px - x) ** 2 + (py - y) ** 2; if (label === arguments[0] + 1 && d < distance) { distance = d; best = [px, py]; } });"
        "return best;", index)


def test_hover_shows_predicted_iou_and_area(uploaded):
    # The best-scored mask other than the largest (the background), hovered at its pixel on top
    # nearest to the centroid of those pixels.
    annotations = page_state(uploaded, "annotations")
    largest = max(range(len(annotations)), key=lambda i: annotations[i]["area"])
    index = max((i for i in range(len(annotations)) if i != largest), key=lambda i: annotations[i]["predicted_iou"])
    x, y = pixel_of_mask(uploaded, index)
    canvas = uploaded.find_element(By.ID, "highlight-canvas")
    ActionChains(uploaded).move_to_element_with_offset(canvas, *screen_offset(uploaded, x, y)).perform()
    wait_for(uploaded, lambda d: page_state(d, "hovered") >= 0)
    assert page_state(uploaded, "hovered") == index
    text = uploaded.find_element(By.ID, "hover-info").text
    assert f"mask {index}: predicted IoU {annotations[index]['predicted_iou']:.3f}" in text
    assert f"area {annotations[index]['area']:,} px" in text
    uploaded.save_screenshot(str(ARTIFACTS / "web-page-hover.png"))
    ActionChains(uploaded).click().perform()  # selects it
    wait_for(uploaded, lambda d: page_state(d, "selected") == index)
    assert "selected" in uploaded.find_element(By.CSS_SELECTOR, f"#mask-list tr[data-index='{index}']").get_attribute("class")
    # The click tool shows no mask's figures; back in the every-mask tool, the selected one's.
    uploaded.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
    assert uploaded.find_element(By.ID, "hover-info").text.strip() == ""
    uploaded.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").click()
    assert f"mask {index}: predicted IoU" in uploaded.find_element(By.ID, "hover-info").text
    ActionChains(uploaded).move_to_element_with_offset(canvas, *screen_offset(uploaded, x, y)).click().perform()
    wait_for(uploaded, lambda d: page_state(d, "selected") == -1)


def test_hovering_does_not_paint_the_selected_mask_again(uploaded):
    """The selected mask is painted once, when selected: on a large image, painting a large
    mask on every hover made hovering slow. Hovering paints the hovered mask alone."""
    rows = uploaded.find_elements(By.CSS_SELECTOR, "#mask-list tbody tr")
    rows[0].click()  # the largest mask (sorted by area)
    selected = page_state(uploaded, "selected")
    # Each paint of a mask, through the page's global paintMask: selected or not.
    uploaded.execute_script("""
        window.realPaintMask = window.paintMask;
        window.painted = [];
        window.paintMask = (context, counts, rgb) => {
          const s = window.sam2page.state;
          window.painted.push(counts === s.counts[s.selected] ? "selected" : "other");
          return window.realPaintMask(context, counts, rgb);
        };""")
    try:
        for row in rows[1:4]:
            ActionChains(uploaded).move_to_element(row).perform()
        ActionChains(uploaded).move_to_element(uploaded.find_element(By.ID, "sort-by")).perform()
        assert uploaded.execute_script("return window.painted") == ["other"] * 3
    finally:
        uploaded.execute_script("window.paintMask = window.realPaintMask;")
    rows[0].click()  # unselected again
    assert page_state(uploaded, "selected") == -1 and selected >= 0


def test_the_keyboard_reaches_the_file_chooser_and_selects_masks(uploaded):
    """"Choose an image…" shows the keyboard's focus (its file input is invisible); the mask
    list is one Tab stop whose rows the arrows, Home and End move between, each showing its
    figures when focused; Tab leaves the list and comes back to the row it left; Enter or Space
    selects one."""
    uploaded.execute_script("document.querySelector('input[name=tool][value=everything]').focus()")
    ActionChains(uploaded).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
    assert uploaded.switch_to.active_element.get_attribute("id") == "file"
    label = uploaded.find_element(By.CSS_SELECTOR, "label.button")
    assert label.value_of_css_property("outline-style") != "none"

    uploaded.execute_script("document.getElementById('sort-by').focus()")
    rows = uploaded.find_elements(By.CSS_SELECTOR, "#mask-list tbody tr")
    assert len(rows) >= 3
    # The pointer off the list: End scrolls the page, and a row moved under the pointer would be
    # hovered, its figures shown instead of the focused row's (as a mouse user would want).
    ActionChains(uploaded).move_to_element(uploaded.find_element(By.TAG_NAME, "h1")).perform()

    def press(*keys, shift=False):
        actions = ActionChains(uploaded).key_down(Keys.SHIFT) if shift else ActionChains(uploaded)
        actions = actions.send_keys(*keys)
        (actions.key_up(Keys.SHIFT) if shift else actions).perform()
        return uploaded.switch_to.active_element

    for keys, shift, row in [((Keys.TAB,), False, rows[0]), ((Keys.ARROW_DOWN,), False, rows[1]),
                             ((Keys.END,), False, rows[-1]), ((Keys.HOME,), False, rows[0]),
                             ((Keys.ARROW_UP,), False, rows[0]), ((Keys.ARROW_DOWN,), False, rows[1])]:
        assert press(*keys, shift=shift) == row
        index = int(row.get_attribute("data-index"))
        assert uploaded.find_element(By.ID, "hover-info").text.startswith(f"mask {index}: predicted IoU")
    assert press(Keys.TAB).tag_name != "tr"  # one Tab leaves the list, however long
    assert press(Keys.TAB, shift=True) == rows[1]  # and comes back to the row it left
    ActionChains(uploaded).send_keys(Keys.ENTER).perform()
    assert page_state(uploaded, "selected") == index
    ActionChains(uploaded).send_keys(Keys.SPACE).perform()
    assert page_state(uploaded, "selected") == -1
    uploaded.execute_script("document.activeElement.blur()")


def test_click_mask_equals_segment_answer(uploaded, server):
    uploaded.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
    wait_for(uploaded, lambda d: page_state(d, "imageId") is not None)
    canvas = uploaded.find_element(By.ID, "highlight-canvas")
    ActionChains(uploaded).move_to_element_with_offset(canvas, -40, 10).click().perform()
    wait_for(uploaded, lambda d: page_state(d, "clickAnswer") is not None)
    ActionChains(uploaded).move_to_element_with_offset(canvas, 60, -30).context_click().perform()
    wait_for(uploaded, lambda d: (page_state(d, "clickPrompt") or {}).get("labels") == [1, 0])
    uploaded.save_screenshot(str(ARTIFACTS / "web-page-click.png"))
    image_id, prompt, shown = (page_state(uploaded, name) for name in ("imageId", "clickPrompt", "clickAnswer"))
    request = urllib.request.Request(server + "/segment", json.dumps({"image_id": image_id, "prompts": [prompt]}).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        assert json.load(response) == shown
    assert shown["results"][0]["masks"][0]["size"] == list(Image.open(EXAMPLE).size[::-1])
    uploaded.find_element(By.ID, "clear-clicks").click()
    wait_for(uploaded, lambda d: page_state(d, "clickAnswer") is None)
    assert status(uploaded).startswith("Click: a point on the object")  # not the cleared mask's figures
    uploaded.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").click()
    assert " masks in " in status(uploaded)  # the every-mask tool's own status again
    assert not uploaded.find_element(By.ID, "clear-clicks").is_enabled()


def test_a_refused_click_is_taken_back_and_undo_removes_clicks_and_the_box(uploaded):
    """The server takes 64 points at most: the 65th click is refused (400), and taken back, so the
    next clicks still work; Ctrl+Z and Backspace take back the last click, or the box."""
    uploaded.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
    wait_for(uploaded, lambda d: page_state(d, "imageId") is not None)
    canvas = uploaded.find_element(By.ID, "highlight-canvas")
    points = lambda: len((page_state(uploaded, "clickPrompt") or {}).get("points", []))  # noqa: E731
    clicks = ActionChains(uploaded, duration=0)  # no 250 ms glide to each point
    for i in range(64):
        clicks.move_to_element_with_offset(canvas, -120 + 30 * (i % 8), -80 + 20 * (i // 8)).click()
    clicks.perform()
    wait_for(uploaded, lambda d: points() == 64)
    assert not uploaded.find_element(By.ID, "error").is_displayed()
    # Two clicks more at once: both taken back, the 64 points' mask stays.
    ActionChains(uploaded).move_to_element_with_offset(canvas, 100, 60).click().move_by_offset(-10, 0).click().perform()
    wait_for(uploaded, lambda d: d.find_element(By.ID, "error").is_displayed(), timeout=30)
    assert "at most 64" in uploaded.find_element(By.ID, "error").text
    wait_for(uploaded, lambda d: len(page_state(d, "clicks")) == 64, timeout=30)
    time.sleep(0.3)  # nothing else comes
    assert len(page_state(uploaded, "clicks")) == 64 and points() == 64
    assert uploaded.find_element(By.ID, "error").is_displayed()  # until the next change

    ActionChains(uploaded).send_keys(Keys.BACKSPACE).perform()
    wait_for(uploaded, lambda d: points() == 63)
    assert not uploaded.find_element(By.ID, "error").is_displayed()
    ActionChains(uploaded).key_down(Keys.CONTROL).send_keys("z").key_up(Keys.CONTROL).perform()
    wait_for(uploaded, lambda d: points() == 62)
    ActionChains(uploaded).move_to_element_with_offset(canvas, -60, -40).click_and_hold().move_by_offset(60, 50) \
        .release().perform()  # a box
    wait_for(uploaded, lambda d: "box" in (page_state(d, "clickPrompt") or {}))
    ActionChains(uploaded).key_down(Keys.CONTROL).send_keys("z").key_up(Keys.CONTROL).perform()
    wait_for(uploaded, lambda d: "box" not in (page_state(d, "clickPrompt") or {}) and points() == 62)
    uploaded.find_element(By.ID, "clear-clicks").click()
    wait_for(uploaded, lambda d: page_state(d, "clickAnswer") is None)
    uploaded.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").click()


def downloaded(directory: Path, name: str) -> bytes:
    path = directory / name
    deadline = time.monotonic() + 30
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert path.is_file(), f"{name} was not downloaded: {sorted(p.name for p in directory.iterdir())}"
    return path.read_bytes()


def test_downloads_equal_the_server_answers(uploaded, server, downloads):
    for button in ("download-rle", "download-coco", "download-png"):
        uploaded.find_element(By.ID, button).click()
    masks = downloaded(downloads, "shapes_masks.json")
    assert masks == server_answer(server, EXAMPLE)
    # The COCO download is a dataset file that pycocotools reads: the image, and the server's
    # records (?format=coco) with the ids COCO needs; their masks are those of /upload_rle.
    downloaded(downloads, "shapes_coco.json")
    dataset = COCO(str(downloads / "shapes_coco.json"))
    width, height = Image.open(EXAMPLE).size
    assert dataset.imgs == {1: {"id": 1, "file_name": EXAMPLE.name, "width": width, "height": height}}
    assert dataset.cats == {1: {"id": 1, "name": "object"}}
    records = json.loads(server_answer(server, EXAMPLE, "?format=coco"))
    annotations = dataset.loadAnns(dataset.getAnnIds(imgIds=[1]))
    assert len(annotations) == len(records) == len(json.loads(masks))
    for i, (annotation, record, rle) in enumerate(zip(annotations, records, json.loads(masks).values())):
        assert annotation == {**record, "id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0}
        np.testing.assert_array_equal(dataset.annToMask(annotation), mask_utils.decode(mask_utils.frPyObjects(rle, height, width)))
    overlay = downloads / "shapes_overlay.png"
    downloaded(downloads, overlay.name)
    with Image.open(overlay) as image:
        assert image.size == Image.open(EXAMPLE).size


def set_filters(driver, values: dict[str, str]) -> None:
    for name, value in values.items():
        field = driver.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)


def test_the_filters_ask_again_for_the_masks_of_other_thresholds(uploaded, server):
    """The Filters box starts at the server's settings; "Segment again" asks /upload_rle for the
    open image's masks under the values set apart from them, and the masks on the page are then
    the server's answer to that query, byte for byte. Masks added or removed are not dropped
    without asking."""
    page = uploaded
    study_json = lambda: page.execute_script("return window.sam2page.studyJson()")  # noqa: E731
    server_settings = {"pred_iou_thresh": "0.8", "stability_score_thresh": "0.95", "stability_score_offset": "1",
                       "box_nms_thresh": "0.7"}
    assert {name: page.find_element(By.ID, name).get_attribute("value") for name in server_settings} == server_settings
    default = server_answer(server, EXAMPLE).decode()
    assert study_json() == default
    page.find_element(By.CSS_SELECTOR, "#filters summary").click()
    set_filters(page, {"pred_iou_thresh": "0.6", "stability_score_thresh": "0.9"})
    page.find_element(By.ID, "segment-again").click()
    loose = server_answer(server, EXAMPLE, "?pred_iou_thresh=0.6&stability_score_thresh=0.9").decode()
    assert len(json.loads(loose)) > len(json.loads(default))  # 28 masks, 17 at the server's settings
    wait_for(page, lambda d: study_json() == loose and "this page's filters" in status(d))
    # A mask selected, then Delete typed in a field of the box: the field's key, not the page's.
    page.find_element(By.CSS_SELECTOR, "#mask-list tr[data-index='0']").click()
    page.find_element(By.ID, "pred_iou_thresh").send_keys(Keys.DELETE)
    assert study_json() == loose and page_state(page, "selected") == 0
    # A click on the image (another mask selected) takes the keys back from the field: Delete
    # removes it. Then the filters submitted (Enter): asked first; "no" keeps the page as it is.
    canvas = page.find_element(By.ID, "highlight-canvas")
    ActionChains(page).move_to_element_with_offset(canvas, *screen_offset(page, *pixel_of_mask(page, 1))).click().perform()
    wait_for(page, lambda d: page_state(d, "selected") == 1, timeout=10)
    ActionChains(page).send_keys(Keys.DELETE).perform()
    assert "Mask 1 removed" in status(page)
    edited = study_json()
    page.find_element(By.ID, "box_nms_thresh").send_keys(Keys.ENTER)
    wait_for(page, lambda d: "and the clicks, are lost" in d.switch_to.alert.text, timeout=10)
    page.switch_to.alert.dismiss()
    assert study_json() == edited and "Mask 1 removed" in status(page)
    # The server takes any offset above 0 (as small as a server's own may be), none at 0: nor does the field.
    offset_valid = "const field = document.getElementById('stability_score_offset'); field.value = arguments[0];" \
                   "field.dispatchEvent(new Event('input')); return field.validity.valid"
    assert page.execute_script(offset_valid, "0.0005") and not page.execute_script(offset_valid, "0")
    assert page.execute_script(offset_valid, "1e-300") and not page.execute_script(offset_valid, "1e-310")  # 0 there
    set_filters(page, server_settings)
    page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
    page.find_element(By.ID, "segment-again").click()
    page.switch_to.alert.accept()
    assert page.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").is_selected()  # to see them
    wait_for(page, lambda d: study_json() == default and " masks in " in status(d))
    assert "filters" not in status(page)
    # A value out of range typed but not submitted: the next image is not sent under it.
    set_filters(page, {"pred_iou_thresh": "1.5"})
    open_image(page, EXAMPLE)
    error = page.find_element(By.ID, "error")
    wait_for(page, lambda d: error.is_displayed() and "Filters box" in error.text, timeout=10)
    assert study_json() == default
    set_filters(page, {"pred_iou_thresh": "0.8"})
    open_image(page, EXAMPLE)
    wait_for(page, lambda d: not error.is_displayed() and " masks in " in status(d) and study_json() == default)


def test_errors_are_readable_and_the_page_stays_usable(uploaded, tmp_path):
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("these are not pixels")
    open_image(uploaded, not_an_image)
    wait_for(uploaded, lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "cannot show notes.txt" in uploaded.find_element(By.ID, "error").text  # said by the page itself
    # Nothing was sent: the image open before stays, with its masks (and clicks, had there been any).
    assert "the image before stays" in uploaded.find_element(By.ID, "error").text
    assert "has-image" in uploaded.find_element(By.ID, "viewer").get_attribute("class")
    assert page_state(uploaded, "name") == EXAMPLE.stem and len(page_state(uploaded, "annotations")) > 1
    assert " masks in " in status(uploaded) and not uploaded.find_element(By.ID, "spinner").is_displayed()

    too_large = tmp_path / "large.png"
    Image.new("RGB", (1200, 1000), "white").save(too_large)
    open_image(uploaded, too_large)
    wait_for(uploaded, lambda d: "Too large" in d.find_element(By.ID, "error").text)
    assert f"the limit is {MAX_PIXELS} pixels. Scale the image down, and" in uploaded.find_element(By.ID, "error").text

    # A busy server and a timeout, as the page's fetch would see them.
    # (A JPEG helps with the upload's bytes alone: its pixels are as many.)
    for code, retry_after, message, said in [
            (503, "3", "As the server says; try again in 3 s.", "as the server says"),
            (504, None, "The server took too long", "as the server says"),
            (413, None, "bytes. Scale the image down, or save it as a JPEG, and", "upload larger than the limit of 9 bytes")]:
        uploaded.execute_script(
            "window.realFetch = window.realFetch || window.fetch;"
            "window.fetch = async () => new Response(JSON.stringify({error: arguments[2]}),"
            "  {status: arguments[0], headers: arguments[1] ? {'Retry-After': arguments[1]} : {}});",
            code, retry_after, said)
        open_image(uploaded, EXAMPLE)
        wait_for(uploaded, lambda d: message in d.find_element(By.ID, "error").text)
        assert said in uploaded.find_element(By.ID, "error").text.lower()
    uploaded.execute_script("window.fetch = window.realFetch;")

    open_image(uploaded, EXAMPLE)  # and the next image works
    wait_for(uploaded, lambda d: " masks in " in status(d))
    assert not uploaded.find_element(By.ID, "error").is_displayed()


def test_a_narrow_window_puts_the_image_above_the_list(uploaded):
    open_image(uploaded, EXAMPLE)
    wait_for(uploaded, lambda d: " masks in " in status(d))
    uploaded.set_window_size(420, 900)
    try:
        wait_for(uploaded, lambda d: d.find_element(By.ID, "image-canvas").size["width"] > 300, timeout=10)
        canvas, aside = (uploaded.find_element(By.CSS_SELECTOR, selector) for selector in ("#image-canvas", "aside"))
        assert aside.location["y"] >= canvas.location["y"] + canvas.size["height"]  # the list below the image
        uploaded.save_screenshot(str(ARTIFACTS / "web-page-narrow.png"))
    finally:
        uploaded.set_window_size(1400, 1000)


def test_many_masks_on_a_large_image_are_decoded_and_drawn(uploaded):
    """200 masks on 2000x1500, the size users upload: every pixel of the label map the canvas is
    drawn from (the smallest mask on top) equals the one computed here with pycocotools."""
    height, width, count = 1500, 2000, 200
    rng = np.random.default_rng(0)
    masks = []
    for _ in range(count):
        image = Image.new("1", (width, height))
        x, y = rng.integers(0, width), rng.integers(0, height)
        rx, ry = rng.integers(10, 500), rng.integers(10, 400)
        ImageDraw.Draw(image).ellipse([x - rx, y - ry, x + rx, y + ry], fill=1)
        masks.append(np.asarray(image))
    annotations = []
    for mask in masks:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append({"segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                            "area": int(mask.sum()), "predicted_iou": 0.9, "stability_score": 0.95})
    expected = np.zeros((height, width), dtype=np.int64)
    for index in sorted(range(count), key=lambda i: -annotations[i]["area"]):  # largest first, as the page
        expected[masks[index]] = index + 1

    render_ms = uploaded.execute_script("return window.sam2page.showAnswer(arguments[0], arguments[1], arguments[2])",
                                        json.dumps(annotations), width, height)
    print(f"\n200 masks on 2000x1500 decoded and drawn in {render_ms:.0f} ms")
    histogram = uploaded.execute_script(
        "const counts = new Array(arguments[0] + 1).fill(0);"
        "for (const label of window.sam2page.state.labels) counts[label] += 1; return counts;", count)
    assert histogram == np.bincount(expected.ravel(), minlength=count + 1).tolist()
    samples = rng.integers(0, height * width, 2000)
    labels = uploaded.execute_script("const l = window.sam2page.state.labels; return arguments[0].map(i => l[i]);",
                                     [int(i) for i in samples])  # column-major, as COCO
    assert labels == expected.T.ravel()[samples].tolist()


# --- The page without the server's model: its requests answered in the page ---------------------------


@contextmanager
def stubbed_fetch(driver, answers: dict):
    """Answers the page's requests to these paths in the page itself: path -> [status, JSON body,
    milliseconds before the answer (None: it never comes; "held": when the test calls
    window.release())]; other paths go to the server. Each request's path is logged in
    window.fetchLog, "PATH aborted" once the page cancels it (its answer still comes, as one can
    that was on its way), and "PATH answered" once its answer is given; a JSON body sent, as
    [path, body], in window.fetchBodies."""
    driver.execute_script("""
        window.realFetch = window.realFetch || window.fetch;
        const answers = arguments[0];
        window.fetchLog = [];
        window.fetchBodies = [];
        window.fetch = async (resource, options) => {
          const path = new URL(resource, location.href).pathname;
          window.fetchLog.push(path);
          if (typeof options?.body === "string") window.fetchBodies.push([path, JSON.parse(options.body)]);
          if (!(path in answers)) return window.realFetch(resource, options);
          options?.signal?.addEventListener("abort", () => window.fetchLog.push(`${path} aborted`));
          const [status, body, ms] = answers[path];
          await new Promise((resolve) => ms === "held" ? (window.release = resolve) : ms !== null && setTimeout(resolve, ms));
          window.fetchLog.push(`${path} answered`);
          return new Response(JSON.stringify(body), {status, headers: {"Content-Type": "application/json"}});
        };""", answers)
    try:
        yield
    finally:
        driver.execute_script("window.fetch = window.realFetch;")


def fetch_log(driver) -> list[str]:
    return driver.execute_script("return window.fetchLog")


def rle(mask: np.ndarray) -> dict:
    """A mask as /upload_rle and /segment write it: uncompressed COCO RLE, column-major."""
    flat = np.concatenate([[0], mask.T.ravel().astype(np.int8), [2]])  # 2: a last change to end on
    changes = np.flatnonzero(np.diff(flat)) + 1
    return {"size": list(mask.shape), "counts": np.diff(np.concatenate([[1], changes])).tolist()}


def coco_record(mask: np.ndarray) -> dict:
    """A mask as /upload_rle?format=coco writes it (sam2's generate() record, COCO's box)."""
    encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    return {"segmentation": {"size": encoded["size"], "counts": encoded["counts"].decode()}, "area": int(mask.sum()),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() + 1 - xs.min()), int(ys.max() + 1 - ys.min())],
            "predicted_iou": 0.9, "point_coords": [[float(xs.mean()), float(ys.mean())]], "stability_score": 0.95,
            "crop_box": [0, 0, mask.shape[1], mask.shape[0]]}


SMALL = (64, 48)  # width, height of the images the stubbed server answers for


def small_image(folder: Path, name: str, size: tuple[int, int] = SMALL) -> Path:
    path = folder / name
    Image.new("RGB", size, "#4a7").save(path)
    return path


def stub_answers(segment_ms: int | None = 0, segment_status: int = 200, size: tuple[int, int] = SMALL) -> dict:
    """A server that finds one square on every image of this size and answers each click with it."""
    mask = np.zeros(size[::-1], dtype=bool)
    mask[10:30, 20:40] = True
    segment = ({"image_id": "stub", "results": [{"masks": [rle(mask)], "iou_predictions": [0.9]}]}
               if segment_status == 200 else {"error": f"as the server says ({segment_status})"})
    return {"/upload_rle": [200, [coco_record(mask)], 0], "/embed": [200, {"image_id": "stub", "size": size[::-1]}, 0],
            "/segment": [segment_status, segment, segment_ms]}


@pytest.fixture
def page(browser, server):
    """A fresh page, the server's model known (tests that change the page come last: after them,
    the module's uploaded page is gone)."""
    browser.get(server + "/")
    wait_for(browser, lambda d: "micro" in d.find_element(By.ID, "server-info").text)
    yield browser
    try:  # a test that failed with a dialog open: its failure alone is reported, the next test's page is fresh
        browser.switch_to.alert.dismiss()
    except NoAlertPresentException:
        pass
    browser.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").click()  # (a category left: stored)
    browser.execute_script("sessionStorage.clear()")  # the category ids a test gave: the next test's page knows none


def highlight_alpha(driver) -> int:
    """The opacity summed over the top layer (the click tool's mask and prompts)."""
    return driver.execute_script(
        "const c = document.getElementById('highlight-canvas');"
        "if (!c.width) return 0;"
        "return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 === 3)"
        "  .reduce((a, b) => a + b, 0);")


def test_an_answer_or_error_for_the_previous_image_is_dropped(page, tmp_path):
    """A slow /segment answer (a mask, a refusal, or a 404 that would encode again) for a click
    on one image arrives after the next image is open: nothing of it shows on the new one."""
    images = [small_image(tmp_path, f"{i}.png") for i in range(4)]
    for round, status in enumerate([200, 400, 404]):
        with stubbed_fetch(page, stub_answers(segment_ms="held", segment_status=status)):
            if round == 0:
                open_image(page, images[0])
                page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
            wait_for(page, lambda d: page_state(d, "imageId") == "stub", timeout=10)
            ActionChains(page).move_to_element(page.find_element(By.ID, "highlight-canvas")).click().perform()
            wait_for(page, lambda d: "/segment" in fetch_log(d), timeout=10)
            open_image(page, images[round + 1])
            wait_for(page, lambda d: page_state(d, "name") == images[round + 1].stem  # the new image, encoded
                     and page_state(d, "imageId") == "stub", timeout=60)  # (the old one's id holds until it opens)
            assert "/segment aborted" in fetch_log(page), status  # the server stops what nobody waits for
            embeds = fetch_log(page).count("/embed")
            page.execute_script("window.release()")  # now the old click's answer comes
            wait_for(page, lambda d: "/segment answered" in fetch_log(d), timeout=10)
            time.sleep(0.2)  # the page's handling of that answer
            assert page_state(page, "clickAnswer") is None and page_state(page, "clicks") == [], status
            assert not page.find_element(By.ID, "error").is_displayed(), status
            assert highlight_alpha(page) == 0, status
            assert fetch_log(page).count("/embed") == embeds, status  # no encoding again after a 404


def test_requests_nobody_waits_for_are_cancelled_and_a_failed_click_leaves_no_other_mask(page, tmp_path):
    """Another image cancels the open one's requests (the server stops work whose client has
    gone); clicks made while a /segment runs are asked for together once it ends, one request in
    flight at a time; a click shows its spinner while it runs; a click that fails takes the mask
    of the earlier clicks away with it (it no longer matched the points)."""
    answers = stub_answers(segment_ms="held")
    answers["/upload_rle"][2] = "held"
    with stubbed_fetch(page, answers):
        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
        open_image(page, small_image(tmp_path, "first.png"))
        wait_for(page, lambda d: "/upload_rle" in fetch_log(d), timeout=10)
        open_image(page, small_image(tmp_path, "second.png"))
        wait_for(page, lambda d: fetch_log(d).count("/upload_rle") == 2, timeout=10)
        assert fetch_log(page).count("/upload_rle aborted") == 1
        page.execute_script("window.release()")  # the second image's masks
        wait_for(page, lambda d: page_state(d, "imageId") == "stub", timeout=10)
        canvas = page.find_element(By.ID, "highlight-canvas")
        for offset in (-10, 10, 20):
            ActionChains(page).move_to_element_with_offset(canvas, offset, 0).click().perform()
            wait_for(page, lambda d: "/segment" in fetch_log(d), timeout=10)
            assert status(page) == "Asking the server for the mask…"
            assert page.find_element(By.ID, "spinner").is_displayed()
        wait_for(page, lambda d: len(page_state(d, "clicks")) == 3, timeout=10)
        time.sleep(0.3)
        assert fetch_log(page).count("/segment") == 1  # the first click's, still running
        page.execute_script("window.release()")  # its answer, for one point: dropped, the three asked for
        wait_for(page, lambda d: fetch_log(d).count("/segment") == 2, timeout=10)
        assert page_state(page, "clickAnswer") is None and page.find_element(By.ID, "spinner").is_displayed()
        page.execute_script("window.release()")
        wait_for(page, lambda d: status(d).startswith("Mask in "), timeout=10)
        assert len(page_state(page, "clickPrompt")["points"]) == 3 and "/segment aborted" not in fetch_log(page)
        assert not page.find_element(By.ID, "spinner").is_displayed()
    with stubbed_fetch(page, stub_answers(segment_status=503)):
        ActionChains(page).move_to_element_with_offset(canvas, 0, 10).click().perform()
        wait_for(page, lambda d: d.find_element(By.ID, "error").is_displayed(), timeout=10)
        assert page.find_element(By.ID, "error").text == "As the server says (503)."
        assert page_state(page, "clickAnswer") is None and len(page_state(page, "clicks")) == 4
        assert status(page).startswith("No mask for these clicks: the request failed")
        assert not page.find_element(By.ID, "spinner").is_displayed()


def test_a_stopping_server_is_said_to_be_stopping_and_asked_again(browser, server):
    """/health answers 503 "stopping" once (in the page, before its script starts), then the
    server's own answer: the page says the server is stopping, then which model it runs."""
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        const realFetch = window.fetch;
        let asked = 0;
        window.fetch = (resource, options) => new URL(resource, location.href).pathname === "/health" && asked++ === 0
          ? Promise.resolve(new Response('{"status":"stopping","queued":0}', {status: 503}))
          : realFetch(resource, options);"""})
    try:
        browser.get(server + "/")
        wait_for(browser, lambda d: "stopping" in d.find_element(By.ID, "server-info").text, timeout=10)
        wait_for(browser, lambda d: "micro" in d.find_element(By.ID, "server-info").text, timeout=10)
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", script)


def test_one_mask_is_one_mask(page, tmp_path):
    with stubbed_fetch(page, stub_answers()):
        open_image(page, small_image(tmp_path, "one.png"))
        wait_for(page, lambda d: page_state(d, "labels !== null"), timeout=10)
    assert status(page).startswith("1 mask in ")


def test_a_click_mask_added_to_the_masks_is_listed_and_downloaded_with_them(page, tmp_path):
    """"Add to masks" keeps the click tool's mask: drawn, listed, and in both downloads, its COCO
    record (segmentation, bbox, area) as pycocotools makes it from the /segment mask. Not while
    the mask of clicks since changed is asked for: the mask shown is not theirs."""
    answers = stub_answers(segment_ms="held")
    clicked = np.array(Image.new("1", SMALL))  # the stub's /segment mask, as /segment sent it
    clicked[10:30, 20:40] = True
    assert answers["/segment"][1]["results"][0]["masks"][0] == rle(clicked)
    keep = page.find_element(By.ID, "keep-click")
    with stubbed_fetch(page, answers):
        in_the_click_tool(page, small_image(tmp_path, "keep.png"))
        wait_for(page, lambda d: page_state(d, "labels !== null"), timeout=10)
        assert not keep.is_enabled()
        canvas = page.find_element(By.ID, "highlight-canvas")
        for clicks in (1, 2):
            ActionChains(page).move_to_element_with_offset(canvas, 3 * clicks, 0).click().perform()
            wait_for(page, lambda d: fetch_log(d).count("/segment") == clicks, timeout=10)
            assert not keep.is_enabled()
            page.execute_script("window.release()")
            wait_for(page, lambda d: len((page_state(d, "clickPrompt") or {}).get("points", [])) == clicks, timeout=10)
            assert keep.is_enabled()
        keep.click()
    assert status(page) == "Added as mask 1; click the next object."
    assert not keep.is_enabled() and page_state(page, "clickAnswer") is None and page_state(page, "clicks") == []
    assert len(page.find_elements(By.CSS_SELECTOR, "#mask-list tbody tr")) == 2
    assert json.loads(page.execute_script("return window.sam2page.studyJson()"))["mask_1"] == rle(clicked)
    dataset = tmp_path / "coco.json"
    dataset.write_text(page.execute_script("return cocoDataset()"))
    coco = COCO(str(dataset))
    record = coco.loadAnns([2])[0]
    assert np.array_equal(coco.annToMask(record), clicked)
    encoded = mask_utils.encode(np.asfortranarray(clicked.astype(np.uint8)))
    assert record["segmentation"]["counts"] == encoded["counts"].decode()
    assert record["bbox"] == mask_utils.toBbox(encoded).tolist() and record["area"] == int(clicked.sum())
    assert record["predicted_iou"] == 0.9 and record["prompt"]["labels"] == [1, 1] and len(record["prompt"]["points"]) == 2
    page.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").click()
    assert status(page) == "1 mask from the server and 1 added by clicks."
    page.execute_script("setHovered(1)")
    assert page.find_element(By.ID, "hover-info").text == "mask 1: predicted IoU 0.900, area 400 px, made by clicks"
    # Run lengths of every size, and runs shorter than those two before them (negative differences).
    rng = np.random.default_rng(0)
    masks = [rng.random((70, 90)) < 0.5, np.zeros((700, 900), bool), np.ones((3, 3), bool)]
    masks[1][5:600, 100:800] = True
    for mask in masks:
        encoded = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        assert page.execute_script("return encodeCounts(arguments[0])", rle(mask)["counts"]) == encoded


def test_other_candidate_shows_a_points_next_mask_and_add_to_masks_takes_the_one_shown(page, tmp_path):
    """One point alone gives three candidates, best first: "Other candidate" shows the next (after
    the last, the best again), with its predicted IoU, and "Add to masks" adds the one shown. An
    answer of one mask leaves the button off."""
    answers = stub_answers()
    candidates = [np.zeros(SMALL[::-1], bool) for _ in range(3)]
    for index, candidate in enumerate(candidates):  # three sizes: each paints its own area
        candidate[5:15 + 10 * index, 5:25 + 10 * index] = True
    answers["/segment"][1]["results"][0] = {"masks": [rle(c) for c in candidates], "iou_predictions": [0.9, 0.8, 0.7]}
    other = page.find_element(By.ID, "next-candidate")
    with stubbed_fetch(page, answers):
        in_the_click_tool(page, small_image(tmp_path, "candidates.png"))
        wait_for(page, lambda d: page_state(d, "labels !== null"), timeout=10)
        assert not other.is_enabled()
        ActionChains(page).move_to_element(page.find_element(By.ID, "highlight-canvas")).click().perform()
        wait_for(page, lambda d: page_state(d, "clickAnswer") is not None, timeout=10)
        painted = []
        for shown in (0, 1, 2, 0, 1, 2):
            assert page.execute_script("return shownCandidate().counts") == rle(candidates[shown])["counts"]
            best = " (the best)" if shown == 0 else ""
            text = status(page)
            iou = 0.9 - shown / 10
            assert text.startswith(f"Candidate {shown + 1} of 3{best}: predicted IoU {iou:.3f}, mask in "), text
            assert text.endswith(' ms. "Other candidate" shows the next.') and "empty" not in text, text
            painted.append(highlight_alpha(page))
            if len(painted) < 6:
                other.click()
        assert len(set(painted[:3])) == 3 and painted[:3] == painted[3:]  # each drawn, the same each time round
        page.find_element(By.ID, "keep-click").click()
        assert json.loads(page.execute_script("return window.sam2page.studyJson()"))["mask_1"] == rle(candidates[2])
        assert page.execute_script("return window.sam2page.state.annotations[1].predicted_iou") == 0.7
        assert not other.is_enabled()  # no clicks: no mask
    with stubbed_fetch(page, stub_answers()):  # one mask: nothing to cycle through
        ActionChains(page).move_to_element(page.find_element(By.ID, "highlight-canvas")).click().perform()
        wait_for(page, lambda d: page_state(d, "clickAnswer") is not None, timeout=10)
        assert status(page).startswith("Mask in ") and status(page).endswith(" ms, predicted IoU 0.900.")
        assert not other.is_enabled()
    # An empty candidate says why "Add to masks" is off; the others can be added.
    with_an_empty_one = json.loads(json.dumps(answers))
    with_an_empty_one["/segment"][1]["results"][0]["masks"][1] = rle(np.zeros(SMALL[::-1], bool))
    with stubbed_fetch(page, with_an_empty_one):
        ActionChains(page).move_to_element(page.find_element(By.ID, "highlight-canvas")).click().perform()
        wait_for(page, lambda d: status(d).startswith("Candidate 1 of 3 (the best)"), timeout=10)
        keep = page.find_element(By.ID, "keep-click")
        assert keep.is_enabled() and "empty" not in status(page)
        other.click()
        assert status(page).endswith(' ms. It is empty, so there is nothing to add. "Other candidate" shows the next.')
        assert not keep.is_enabled()
        other.click()
        assert keep.is_enabled() and "empty" not in status(page)
    page.find_element(By.ID, "clear-clicks").click()
    # A point's candidate chosen, a second point asked for, then undone while it runs: the first
    # point's prompt is asked again, and its answer keeps the candidate chosen (it was reset to
    # the best, unseen, while the labeller could be pressing "Add to masks").
    answers["/segment"][2] = "held"
    with stubbed_fetch(page, answers):
        pointer(page, "pointerdown", 30, 20)
        pointer(page, "pointerup", 30, 20)
        wait_for(page, lambda d: fetch_log(d).count("/segment") == 1, timeout=10)
        page.execute_script("window.release()")
        wait_for(page, lambda d: page_state(d, "clickAnswer") is not None, timeout=10)
        other.click()
        pointer(page, "pointerdown", 50, 20)
        pointer(page, "pointerup", 50, 20)
        wait_for(page, lambda d: fetch_log(d).count("/segment") == 2, timeout=10)
        page.execute_script("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'z', ctrlKey: true, "
                            "bubbles: true}))")
        page.execute_script("window.release()")  # the two points' answer: the first point's asked again
        wait_for(page, lambda d: fetch_log(d).count("/segment") == 3, timeout=10)
        page.execute_script("window.release()")
        wait_for(page, lambda d: fetch_log(d).count("/segment answered") == 3, timeout=10)
        wait_for(page, lambda d: page_state(d, "segmentInFlight") == 0, timeout=10)  # the answer taken
        assert page_state(page, "candidate") == 1 and status(page).startswith("Candidate 2 of 3: ")
        assert page_state(page, "clickPrompt.points") == [[30.5, 20.5]]  # the pixel's centre
    # Undo with the keyboard on the button it turns off: the keyboard goes to the tool, not <body>.
    with stubbed_fetch(page, stub_answers()):
        other.send_keys(Keys.CONTROL, "z")
        wait_for(page, lambda d: not other.is_enabled(), timeout=10)
        assert page.execute_script("return document.activeElement.matches('input[name=tool]:checked')")
    page.find_element(By.ID, "clear-clicks").click()


def test_masks_saved_from_the_page_open_again_over_the_image(page, tmp_path):
    """"Open masks" takes a labeller's saved work back: the COCO annotations file (the server's
    records, masks added by clicks with their prompts, another tool's uncompressed RLE without
    scores) or the Masks JSON replace the masks shown, drawn, listed and downloaded as saved, and
    are not unsaved edits. A file of another size, not JSON, or of polygons changes nothing and
    says why; over masks edited here, or for an image of another name, it asks first."""
    opener = page.find_element(By.ID, "open-masks")
    assert not opener.is_enabled()  # no image, no masks to replace
    squares = [np.zeros(SMALL[::-1], bool) for _ in range(3)]
    for index, square in enumerate(squares):
        square[5 + 10 * index:12 + 10 * index, 4 + 15 * index:16 + 15 * index] = True
    added = {**coco_record(squares[1]), "predicted_iou": 0.7, "prompt": {"points": [[10.5, 8.5]], "labels": [1]}}
    for key in ("point_coords", "stability_score", "crop_box"):  # a mask added by clicks has its prompt instead
        del added[key]
    saved = {"images": [{"id": 7, "file_name": "work.png", "width": SMALL[0], "height": SMALL[1]}],
             "annotations": [{**coco_record(squares[0]), "id": 1, "image_id": 7},
                             {**added, "id": 2, "image_id": 7},
                             {"segmentation": rle(squares[2]), "id": 3, "image_id": 7, "category_id": 1}],
             "categories": [{"id": 1, "name": "object"}]}
    with stubbed_fetch(page, stub_answers()):
        open_image(page, small_image(tmp_path, "work.png"))
        wait_for(page, lambda d: page_state(d, "labels !== null"), timeout=10)
    assert opener.is_enabled()

    def open_masks(name: str, text: str) -> None:
        (tmp_path / name).write_text(text)
        opener.send_keys(str(tmp_path / name))

    open_masks("work_coco.json", json.dumps(saved))
    wait_for(page, lambda d: status(d) == "3 masks opened from work_coco.json.", timeout=10)
    assert json.loads(page.execute_script("return studyJson()")) == {f"mask_{i}": rle(s) for i, s in enumerate(squares)}
    assert len(page.find_elements(By.CSS_SELECTOR, "#mask-list tbody tr")) == 3
    assert not page.execute_script("return masksEdited()")  # saved work: another image does not ask
    (tmp_path / "again.json").write_text(page.execute_script("return cocoDataset()"))
    coco = COCO(str(tmp_path / "again.json"))
    records = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    for record, square in zip(records, squares):
        assert np.array_equal(coco.annToMask(record), square)
        encoded = mask_utils.encode(np.asfortranarray(square.astype(np.uint8)))
        assert record["segmentation"]["counts"] == encoded["counts"].decode()  # compressed, as pycocotools writes it
        assert record["bbox"] == mask_utils.toBbox(encoded).tolist() and record["area"] == int(square.sum())
    assert records[0] == {**coco_record(squares[0]), "id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0}
    assert records[1]["prompt"] == added["prompt"] and records[1]["predicted_iou"] == 0.7
    assert records[2]["predicted_iou"] is None
    page.execute_script("setHovered(2)")
    assert page.find_element(By.ID, "hover-info").text == "mask 2: predicted IoU none, area 84 px, no stability given"
    page.execute_script("setHovered(-1)")
    # Files that are not this image's masks: said so, the masks shown stay.
    shown = page.execute_script("return studyJson()")
    for name, text, problem in [
            ("notes.json", "not JSON at all", "it is not JSON"),
            ("other.json", json.dumps({**saved, "annotations": [{**saved["annotations"][0],
                                       "segmentation": rle(np.ones((10, 12), bool))}]}),
             "mask 0 is 12x10, and the image open is 64x48"),
            ("polygons.json", json.dumps([{"segmentation": [[1, 1, 9, 1, 9, 9]], "area": 32}]),
             "mask 0 has a polygon: RLE masks only"),
            ("cut.json", json.dumps([{"segmentation": {"size": [48, 64], "counts": [5, 3]}}]),
             "mask 0's run lengths do not cover the image's 64x48 pixels"),
            ("text.json", json.dumps([{"segmentation": {"size": ["48", "64"], "counts": rle(squares[0])["counts"]}}]),
             "mask 0's size is not [height, width] in pixels"),
            ("elsewhere.json",
             json.dumps({**saved, "annotations": [{**a, "image_id": 8} for a in saved["annotations"]]}),
             "none of its 3 annotations is of its image (id 7)")]:
        open_masks(name, text)
        wait_for(page, lambda d: d.find_element(By.ID, "error").is_displayed(), timeout=10)
        assert page.find_element(By.ID, "error").text == f"{name} cannot be opened as this image's masks: {problem}."
        assert page.execute_script("return studyJson()") == shown
        page.execute_script("clearError()")
    # Another image's masks (a neighbouring frame, of the same size): only once the labeller agrees.
    other_frame = {**saved, "images": [{**saved["images"][0], "id": "7", "file_name": "frame_2.png"}]}  # ids as text
    for answer in ("dismiss", "accept"):
        open_masks("frame_2_coco.json", json.dumps(other_frame))
        asked = "frame_2_coco.json holds the masks of frame_2.png. Open them over work.png?"
        wait_for(page, lambda d: d.switch_to.alert.text == asked, timeout=10)
        getattr(page.switch_to.alert, answer)()
        opened = "frame_2_coco.json" if answer == "accept" else "work_coco.json"
        assert status(page) == f"3 masks opened from {opened}."
    # The Masks JSON (no scores) opens too; over a removal made here, only once the labeller agrees.
    page.find_element(By.CSS_SELECTOR, "#mask-list tr[data-index='0']").click()
    page.find_element(By.ID, "remove-mask").click()
    assert status(page) == ("Mask 0 removed; masks 1 to 2 are now 0 to 1. 1 mask opened from frame_2_coco.json "
                            "and 1 added by clicks.")
    assert page.execute_script("return masksEdited()")
    for answer in ("dismiss", "accept"):
        open_masks("work_masks.json", shown)
        wait_for(page, lambda d: "Open the masks of work_masks.json?" in d.switch_to.alert.text, timeout=10)
        getattr(page.switch_to.alert, answer)()
        assert len(json.loads(page.execute_script("return studyJson()"))) == (2 if answer == "dismiss" else 3)
    assert page.execute_script("return studyJson()") == shown and not page.execute_script("return masksEdited()")
    assert not page.find_element(By.ID, "put-back-mask").is_enabled()  # the removal is not put back among them
    assert page_state(page, "annotations.map((a) => a.predicted_iou)") == [None, None, None]
    # In the click tool, which shows the masks added alone, the status line says so too; over
    # clicks made, only once the labeller agrees, and they go.
    with stubbed_fetch(page, stub_answers()):
        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
        wait_for(page, lambda d: page_state(d, "imageId") == "stub", timeout=10)
        pointer(page, "pointerdown", 30, 20)
        pointer(page, "pointerup", 30, 20)
        wait_for(page, lambda d: page_state(d, "clickAnswer") is not None, timeout=10)
        for answer in ("dismiss", "accept"):
            open_masks("work_coco.json", json.dumps(saved))
            wait_for(page, lambda d: d.switch_to.alert.text == "Open the masks of work_coco.json? The clicks are lost "
                                                               "(download the COCO annotations first).", timeout=10)
            getattr(page.switch_to.alert, answer)()
            assert len(page_state(page, "clicks")) == (1 if answer == "dismiss" else 0)
        wait_for(page, lambda d: status(d).startswith("3 masks opened from work_coco.json. Click: a point"), timeout=10)
        assert page_state(page, "clickAnswer") is None


def list_order(driver) -> list[str]:
    """The masks' numbers in the list's order."""
    return [row.get_attribute("data-index") for row in driver.find_elements(By.CSS_SELECTOR, "#mask-list tbody tr")]


def category_cells(driver) -> list[str]:
    """The list's category column, in the masks' order."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#mask-list tbody tr')].sort((a, b) => a.dataset.index - b.dataset.index)"
        ".map((row) => row.cells[4].textContent)")


def test_categories_given_on_the_page_are_the_coco_file_s_and_open_again(page, tmp_path):
    """A labeller names each mask's category (the selected mask's, or the click tool's for the
    masks it adds): listed, said once given, an edit asked about, and in the COCO file as
    categories whose ids hold for every image labelled on the page; the file opened again gives
    them back, another tool's ids kept where free. The field's keys (Backspace, Delete) are the
    field's, not the page's; F2 in the list goes to it, Enter back, Escape puts back its name."""
    squares = [np.zeros(SMALL[::-1], bool) for _ in range(2)]
    squares[0][5:20, 4:20] = True
    squares[1][25:40, 30:60] = True
    answers = {**stub_answers(segment_ms="held"), "/upload_rle": [200, [coco_record(square) for square in squares], 0]}
    field = page.find_element(By.ID, "category")
    row = lambda i: page.find_element(By.CSS_SELECTOR, f"#mask-list tr[data-index='{i}']")  # noqa: E731
    figures = lambda: page.find_element(By.ID, "hover-info").text  # noqa: E731
    with stubbed_fetch(page, answers):
        open_image(page, small_image(tmp_path, "pets.png"))
        wait_for(page, lambda d: page_state(d, "labels !== null"), timeout=10)
        assert not field.is_enabled() and page.find_element(By.ID, "category-label").text == (
            "Category of the selected mask")
        row(0).click()
        assert field.is_enabled() and field.get_attribute("value") == ""
        field.send_keys("x")
        assert page.execute_script("return masksEdited()")
        field.send_keys(Keys.BACKSPACE)  # back as it was: no edit
        assert not page.execute_script("return masksEdited()")
        field.send_keys("cat")  # given as it is typed; its figures said once given (screen readers hear them)
        assert category_cells(page) == ["cat", ""] and page.execute_script("return masksEdited()")
        assert "category" not in figures()
        field.send_keys(Keys.ENTER)
        assert status(page) == "Mask 0: category cat." and figures().endswith(", stability 0.950, category cat")
        assert focused(page) == "row 0"  # back in the list
        focus_row = page.find_element(By.CSS_SELECTOR, "#mask-list tr[data-index='1']")
        focus_row.send_keys(Keys.F2)  # from the list: its row's mask selected, its category to type
        assert focused(page) == "category" and page_state(page, "selected") == 1
        field.send_keys("object")  # the default's name: no category
        assert category_cells(page) == ["cat", ""]
        field.send_keys(Keys.BACKSPACE, Keys.DELETE)  # the field's keys: no click taken back, no mask removed
        assert category_cells(page) == ["cat", "objec"]
        field.send_keys(Keys.ESCAPE)  # as it was when the keyboard came
        assert category_cells(page) == ["cat", ""] and field.get_attribute("value") == ""
        field.send_keys("dog", Keys.ENTER)
        assert category_cells(page) == ["cat", "dog"]
        assert list_order(page) == ["1", "0"]  # by area
        row(0).click()  # the list's Tab stop on mask 0's row; then mask 1 selected on the image
        row(0).click()
        pointer(page, "pointerdown", 40, 30)
        pointer(page, "pointerup", 40, 30)
        assert page_state(page, "selected") == 1
        field.click()
        field.send_keys(Keys.ENTER)  # back in the list: on the selected mask's row (Delete there removes it)
        assert focused(page) == "row 1"
        Select(page.find_element(By.ID, "sort-by")).select_by_value("category")
        assert list_order(page) == ["0", "1"]  # cat, dog
        row(1).click()
        row(1).click()  # selected again
        field.send_keys(Keys.BACKSPACE * 3, "aardvark", Keys.ENTER)  # sorted again once given
        wait_for(page, lambda d: list_order(page) == ["1", "0"] and focused(d) == "row 1", timeout=10)
        row(1).click()
        row(1).click()
        field.send_keys(Keys.BACKSPACE * 8, "zebra")
        assert list_order(page) == ["1", "0"]  # not as each key is typed
        row(0).click()  # the field left by a press on a row: the row's click still selects its mask, then sorted
        wait_for(page, lambda d: list_order(page) == ["0", "1"], timeout=10)
        assert page_state(page, "selected") == 0 and category_cells(page) == ["cat", "zebra"]
        assert page.execute_script("return [...document.querySelectorAll('#category-names option')]"
                                   ".map((o) => o.value)") == ["cat", "zebra"]  # (dog, aardvark: replaced)
        # The click tool's masks take its category; an answer that comes while it is typed leaves it be.
        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
        wait_for(page, lambda d: page_state(d, "imageId") == "stub", timeout=10)
        assert field.is_enabled() and page.find_element(By.ID, "category-label").text == "Category of the masks added"
        pointer(page, "pointerdown", 30, 20)
        pointer(page, "pointerup", 30, 20)
        wait_for(page, lambda d: "/segment" in fetch_log(d), timeout=10)
        field.send_keys(Keys.BACKSPACE)  # the field's key: no click taken back
        assert len(page_state(page, "clicks")) == 1
        field.send_keys("café ")
        page.execute_script("window.release()")
        wait_for(page, lambda d: not d.find_element(By.ID, "keep-click").get_attribute("disabled"), timeout=10)
        field.send_keys("bird", Keys.ENTER)
        assert status(page) == "The masks added from now on: category café bird."
        field.send_keys(Keys.BACKSPACE * 4, "fish", Keys.ESCAPE)  # back to the name given
        assert field.get_attribute("value") == "café bird" and page_state(page, "addCategory") == "café bird"
        assert status(page) == "The masks added from now on: category café bird."
        page.find_element(By.ID, "keep-click").click()
        assert status(page) == "Added as mask 2 (café bird); click the next object."
        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").click()
    Select(page.find_element(By.ID, "sort-by")).select_by_value("area")
    assert category_cells(page) == ["cat", "zebra", "café bird"]
    saved = tmp_path / "pets_coco.json"
    saved.write_text(page.execute_script("return cocoDataset()"))
    assert saved.read_text().isascii()  # pycocotools reads it in the locale's encoding
    coco = COCO(str(saved))
    assert coco.loadCats(coco.getCatIds()) == [  # ids by the order masks carried them: added, then downloaded
        {"id": 1, "name": "object"}, {"id": 2, "name": "café bird"}, {"id": 3, "name": "cat"},
        {"id": 4, "name": "zebra"}]
    records = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert [r["category_id"] for r in records] == [3, 4, 2] and not any("category" in r for r in records)
    # Another image on the same page: the same ids, its masks of the default category.
    row(0).click()  # unselected: no edit
    with stubbed_fetch(page, answers):
        open_image(page, small_image(tmp_path, "more.png"))
        wait_for(page, lambda d: d.switch_to.alert.text == "Open another image? The masks added, removed and given "
                                                           "categories here are lost (download the COCO annotations "
                                                           "first).", timeout=10)
        page.switch_to.alert.accept()
        wait_for(page, lambda d: page_state(d, "labels !== null") and page_state(d, "file.name") == "more.png",
                 timeout=10)
    other = json.loads(page.execute_script("return cocoDataset()"))
    assert other["categories"] == json.loads(saved.read_text())["categories"]
    assert [a["category_id"] for a in other["annotations"]] == [1, 1] and category_cells(page) == ["", ""]
    # Reloaded, the tab keeps the ids (its session storage), and suggests the names it did (not
    # dog and aardvark, replaced before they had an id).
    page.refresh()
    wait_for(page, lambda d: "micro" in d.find_element(By.ID, "server-info").text)
    assert page.execute_script("return [...window.sam2page.state.categoryIds]") == [
        [c["name"], c["id"]] for c in other["categories"]]
    assert page.execute_script("return [...document.querySelectorAll('#category-names option')]"
                               ".map((o) => o.value)") == ["cat", "zebra", "café bird"]
    # The file opened again, in a tab that knew none of its names: its categories, the same ids.
    page.execute_script("sessionStorage.clear()")
    page.refresh()
    wait_for(page, lambda d: "micro" in d.find_element(By.ID, "server-info").text)
    assert page.execute_script("return [...window.sam2page.state.categoryIds]") == [["object", 1]]
    with stubbed_fetch(page, answers):
        open_image(page, small_image(tmp_path, "pets.png"))
        wait_for(page, lambda d: page_state(d, "labels !== null"), timeout=10)
    opener = page.find_element(By.ID, "open-masks")
    opener.send_keys(str(saved))
    wait_for(page, lambda d: status(d) == "3 masks opened from pets_coco.json.", timeout=10)
    assert category_cells(page) == ["cat", "zebra", "café bird"] and not page.execute_script("return masksEdited()")
    assert json.loads(page.execute_script("return cocoDataset()")) == json.loads(saved.read_text())
    # Another tool's ids: its own where the page has not given them to another name (those it has, or
    # no id can be, said); an id it names not, named by its number.
    elsewhere = json.loads(saved.read_text())
    elsewhere["categories"] = [{"id": 0, "name": "vehicles", "supercategory": "none"},  # (Roboflow's 0 comes first)
                               {"id": 9, "name": "car", "supercategory": "vehicles"},
                               {"id": 4, "name": "person", "supercategory": ""}, {"name": "no id"},
                               {"id": 1234567890123456789, "name": "truck"}]  # (no exact number here)
    for annotation, category_id in zip(elsewhere["annotations"], (9, 4, 7)):
        annotation["category_id"] = category_id
    (tmp_path / "elsewhere.json").write_text(json.dumps(elsewhere))
    opener.send_keys(str(tmp_path / "elsewhere.json"))
    wait_for(page, lambda d: status(d) == "3 masks opened from elsewhere.json. Category ids changed here: person: 4 "
                                         "to 10.", timeout=10)  # (those of its masks: not vehicles' and truck's)
    assert category_cells(page) == ["car", "person", "category 7"]
    dataset = json.loads(page.execute_script("return cocoDataset()"))
    assert [(c["id"], c["name"], c.get("supercategory")) for c in dataset["categories"]] == [
        (1, "object", None), (2, "café bird", None), (3, "cat", None), (4, "zebra", None), (7, "category 7", None),
        (9, "car", "vehicles"), (10, "person", None), (11, "vehicles", "none"), (12, "truck", None)]
    assert ["car", 9, "vehicles"] in json.loads(page.execute_script("return sessionStorage['sam2serve.categoryIds']"))
    assert page.execute_script("return categoryId('bus')") == 13  # (after the largest, a new one)
    assert [a["category_id"] for a in dataset["annotations"]] == [9, 10, 7]
    # A file whose ids start at 1, as COCO's do, in a new tab: only the one whose id `object` has moves
    # (above the file's ids); a second file of the same names at other ids: the first five said.
    page.execute_script("sessionStorage.clear()")
    page.refresh()
    wait_for(page, lambda d: "micro" in d.find_element(By.ID, "server-info").text)
    with stubbed_fetch(page, answers):
        open_image(page, small_image(tmp_path, "pets.png"))
        wait_for(page, lambda d: page_state(d, "labels !== null"), timeout=10)
    opener = page.find_element(By.ID, "open-masks")
    for name, shift in (("one_based.json", 0), ("shifted.json", 1)):
        (tmp_path / name).write_text(json.dumps({
            **elsewhere, "categories": [{"id": k + shift, "name": f"class {k}"} for k in range(1, 9)],
            "annotations": [{**elsewhere["annotations"][k % 3], "id": k + 1, "category_id": k + 1 + shift}
                            for k in range(7)]}))
    opener.send_keys(str(tmp_path / "one_based.json"))
    wait_for(page, lambda d: status(d) == "7 masks opened from one_based.json. Category ids changed here: class 1: 1 "
                                         "to 9.", timeout=10)
    opener.send_keys(str(tmp_path / "shifted.json"))
    wait_for(page, lambda d: status(d) == "7 masks opened from shifted.json. Category ids changed here: class 1: 2 to "
                                         "9; class 2: 3 to 2; class 3: 4 to 3; class 4: 5 to 4; class 5: 6 to 5; and "
                                         "2 more.", timeout=10)
    assert [a["category_id"] for a in json.loads(page.execute_script("return cocoDataset()"))["annotations"]] == [
        9, 2, 3, 4, 5, 6, 7]
    row(2).click()
    page.find_element(By.ID, "category").send_keys(" on a trailer, seen from behind and a little from the left")
    assert page.execute_script("return masksEdited()")  # a category changed is an edit
    # A long name is cut in the list, whole in its title: the list does not scroll sideways, and the
    # figures above it keep their height (a row clicked is the row under the pointer).
    assert page.execute_script("const aside = document.querySelector('aside');"
                               "return aside.scrollWidth <= aside.clientWidth")
    page.find_element(By.ID, "category").send_keys(Keys.ENTER)
    for i in (1, 0, 2):  # (the pointer on the row: its figures, of three lines or two, moved it)
        row(i).click()
        assert page_state(page, "selected") == i


def test_category_ids_are_kept_across_a_tab_s_reloads_and_not_in_another_tab(page, server):
    """A tab's ids (and supercategories) hold across its reloads, read back from its storage
    where they can be: a garbled entry, or one whose name or id an entry before it took, is left
    out. Another tab starts again."""
    ids = lambda d: d.execute_script("return [...window.sam2page.state.categoryIds]")  # noqa: E731

    def reloaded():
        page.refresh()
        wait_for(page, lambda d: "micro" in d.find_element(By.ID, "server-info").text)

    assert page.execute_script("return [categoryId('heron'), categoryId('egret')]") == [2, 3]
    # A name given to a mask and replaced, or not downloaded yet: suggested after a reload, with no id.
    page.execute_script("suggestCategory('stork'); categoryGiven()")
    reloaded()
    assert ids(page) == [["object", 1], ["heron", 2], ["egret", 3]]
    assert page.execute_script("return [...document.querySelectorAll('#category-names option')]"
                               ".map((o) => o.value)") == ["stork", "heron", "egret"]
    first = page.current_window_handle
    page.switch_to.new_window("tab")
    try:
        page.get(server + "/")
        wait_for(page, lambda d: "micro" in d.find_element(By.ID, "server-info").text)
        assert ids(page) == [["object", 1]]
        assert page.execute_script("return categoryId('ibis')") == 2
    finally:
        page.close()
        page.switch_to.window(first)
    page.execute_script("sessionStorage.setItem('sam2serve.categoryIds', '{not json')")
    reloaded()
    assert ids(page) == [["object", 1]]
    stored = [["car", 9, "vehicles"], ["bad"], ["x", -1], ["dup", 9], {"name": "y"}, [" ", 3], ["boat", 4, 5],
              ["huge", 2 ** 53], [" car ", 6], ["bus", 2.5]]
    page.execute_script(f"sessionStorage.setItem('sam2serve.categoryIds', {json.dumps(json.dumps(stored))})")
    reloaded()
    assert ids(page) == [["object", 1], ["car", 9], ["boat", 4]]
    assert page.execute_script("return [...window.sam2page.state.supercategories]") == [["car", "vehicles"]]
    assert json.loads(page.execute_script("return sessionStorage['sam2serve.categoryIds']")) == stored  # (as read)
    assert page.execute_script("return categoryId('bus')") == 10
    assert json.loads(page.execute_script("return sessionStorage['sam2serve.categoryIds']")) == [
        ["object", 1], ["car", 9, "vehicles"], ["boat", 4], ["bus", 10]]


def test_category_ids_are_stored_before_the_names_suggested_that_repeat_them(page):
    """A tab's storage is a few million characters: the names suggested (which repeat the ids'
    names) give their room to the ids first, so that a long list of names cannot keep the ids
    from being stored."""
    room = page.execute_script("""
        let [fits, fails] = [0, 1 << 26];  // the most one value may hold here, to a kibi-character
        while (fails - fits > 1024) {
          const size = Math.floor((fits + fails) / 2);
          try { sessionStorage.setItem('probe', 'x'.repeat(size)); fits = size; } catch { fails = size; }
        }
        sessionStorage.clear();
        return fits;""")
    long_name = "n" * (room // 2)
    page.execute_script("sessionStorage.setItem('sam2serve.categoryNames', JSON.stringify([arguments[0]]));"
                        "return categoryId(arguments[1])", "m" * (room // 2 + 1000), long_name)
    page.execute_script("return new Promise((done) => queueMicrotask(done))")  # (stored once the task ends)
    stored = json.loads(page.execute_script("return sessionStorage['sam2serve.categoryIds'] || '[]'"))
    assert [long_name, 2] in stored


def test_a_category_name_replaced_is_no_longer_suggested_where_nothing_else_holds_it(page, tmp_path):
    """A typo mended (a name given, then another in its place) leaves the suggestions and the
    tab's storage, with the id a mask added in the click tool gave it, unless another mask
    carries it, a file downloaded has it, or the click tool adds masks with it. A removed mask
    put back suggests its name again."""
    squares = [np.zeros(SMALL[::-1], bool) for _ in range(2)]
    squares[0][5:20, 4:20] = True
    squares[1][25:40, 30:60] = True
    answers = {**stub_answers(), "/upload_rle": [200, [coco_record(square) for square in squares], 0]}
    field = page.find_element(By.ID, "category")
    row = lambda i: page.find_element(By.CSS_SELECTOR, f"#mask-list tr[data-index='{i}']")  # noqa: E731
    suggested = lambda: page.execute_script(  # noqa: E731
        "return [...document.querySelectorAll('#category-names option')].map((o) => o.value)")
    stored = lambda: json.loads(page.execute_script(  # noqa: E731
        "return new Promise((done) => queueMicrotask(() => done(sessionStorage['sam2serve.categoryNames'])))"))

    def give(i, name):  # F2 on its row goes to the field (a click there would open the field's suggestions)
        row(i).send_keys(Keys.F2)
        field.send_keys(Keys.BACKSPACE * len(field.get_attribute("value")), name, Keys.ENTER)

    with stubbed_fetch(page, answers):
        open_image(page, small_image(tmp_path, "pets.png"))
        wait_for(page, lambda d: page_state(d, "labels !== null"), timeout=10)
        give(0, "dgo")
        assert suggested() == ["dgo"]
        give(0, "dog")  # mended: on no other mask
        assert category_cells(page) == ["dog", ""] and suggested() == stored() == ["dog"]
        give(1, "dog")
        give(0, "cat")  # mask 1 still carries dog
        assert suggested() == stored() == ["dog", "cat"]
        row(1).send_keys(Keys.DELETE)  # dog on a removed mask alone
        give(0, "dog")
        assert suggested() == stored() == ["dog"]
        give(0, "bird")
        assert suggested() == stored() == ["bird"]
        page.find_element(By.ID, "put-back-mask").click()  # its dog again
        assert suggested() == stored() == ["bird", "dog"] and sorted(category_cells(page)) == ["bird", "dog"]
        page.execute_script("cocoDataset()")  # downloaded: bird and dog in a file, kept
        give(0, "")  # no category: the default's, "object"
        assert suggested() == stored() == ["bird", "dog"]
        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
        wait_for(page, lambda d: page_state(d, "imageId") == "stub", timeout=10)
        field.click()
        field.send_keys("eel", Keys.ENTER)
        field.send_keys(Keys.BACKSPACE * 3, "dgo", Keys.ENTER)  # the click tool's name mended
        assert suggested() == stored() == ["bird", "dog", "dgo"]
        pointer(page, "pointerdown", 30, 20)
        pointer(page, "pointerup", 30, 20)
        wait_for(page, lambda d: not d.find_element(By.ID, "keep-click").get_attribute("disabled"), timeout=10)
        page.find_element(By.ID, "keep-click").click()  # a mask of dgo: its id now
        assert page.execute_script("return window.sam2page.state.categoryIds.has('dgo')")
        field.click()
        field.send_keys(Keys.BACKSPACE * 3, "fish", Keys.ENTER)  # dgo kept: its mask carries it
        assert suggested() == ["bird", "dog", "dgo", "fish"]
        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").click()
        give(2, "dog")  # the typo mended on its mask too: gone, with its id
        assert suggested() == stored() == ["bird", "dog", "fish"]
        assert "dgo" not in [c["name"] for c in json.loads(page.execute_script("return cocoDataset()"))["categories"]]


def test_a_mask_selected_on_the_image_is_shown_in_the_list_which_ends_within_the_window(page):
    """Beside the image, the list ends within the window (its last rows a scroll of the list
    away, not of the page); the hovered mask's row is marked; a mask selected on the image
    scrolls the list, not the page, to its row."""
    width, height = 400, 300
    masks = []
    for i in range(80):  # squares less i pixels: sorted by area, mask 79 is the list's last row
        square = np.ones(30 * 30, bool)
        square[:i] = False
        mask = np.zeros((height, width), bool)
        x, y = 40 * (i % 10), 36 * (i // 10)
        mask[y:y + 30, x:x + 30] = square.reshape(30, 30)
        masks.append(mask)
    page.execute_script("window.sam2page.showAnswer(arguments[0], arguments[1], arguments[2])",
                        json.dumps([coco_record(mask) for mask in masks]), width, height)
    geometry = lambda: page.execute_script("""  // noqa: E731
        const aside = document.querySelector("aside"), list = aside.getBoundingClientRect();
        const row = document.querySelector("#mask-list tr[data-index='79']").getBoundingClientRect();
        return {top: list.top, bottom: list.bottom, rowTop: row.top, rowBottom: row.bottom,
                window: window.innerHeight, scrolled: window.scrollY, overflows: aside.scrollHeight > aside.clientHeight}""")
    before = geometry()
    assert before["overflows"] and before["bottom"] <= before["window"] and before["rowTop"] >= before["bottom"], before
    canvas = page.find_element(By.ID, "highlight-canvas")
    ActionChains(page).move_to_element_with_offset(canvas, *screen_offset(page, 360 + 20, 252 + 20)).perform()
    wait_for(page, lambda d: page_state(d, "hovered") == 79, timeout=10)
    row = page.find_element(By.CSS_SELECTOR, "#mask-list tr[data-index='79']")
    assert "hovered" in row.get_attribute("class").split()
    ActionChains(page).click().perform()
    wait_for(page, lambda d: page_state(d, "selected") == 79, timeout=10)
    after = geometry()
    in_sight = after["top"] - 1 <= after["rowTop"] and after["rowBottom"] <= after["bottom"] + 1  # a pixel's rounding
    assert in_sight and after["scrolled"] == 0, after


def test_a_removed_mask_leaves_the_drawing_the_list_and_the_downloads(page):
    """"Remove the selected mask" (or Delete): the mask goes from the label map the drawing is
    made of, the list and the downloads; the others keep their records and colours."""
    width, height = 80, 60
    ys, xs = np.mgrid[:height, :width]
    masks = [xs < 40, (xs - 60) ** 2 + (ys - 30) ** 2 < 100, ys < 10]
    page.execute_script("window.sam2page.showAnswer(arguments[0], arguments[1], arguments[2])",
                        json.dumps([coco_record(mask) for mask in masks]), width, height)
    colours = page_state(page, "colours")
    remove = page.find_element(By.ID, "remove-mask")
    row = lambda index: page.find_element(By.CSS_SELECTOR, f"#mask-list tr[data-index='{index}']")  # noqa: E731
    assert not remove.is_enabled()
    row(1).click()
    remove.click()
    assert status(page) == "Mask 1 removed; mask 2 is now 1. 2 masks from the server and 0 added by clicks."
    assert page_state(page, "selected") == -1 and not remove.is_enabled()
    assert json.loads(page.execute_script("return window.sam2page.studyJson()")) == {"mask_0": rle(masks[0]),
                                                                                   "mask_1": rle(masks[2])}
    assert [a["bbox"] for a in page_state(page, "annotations")] == [coco_record(masks[0])["bbox"],
                                                                   coco_record(masks[2])["bbox"]]
    assert page_state(page, "colours") == [colours[0], colours[2]]
    added = xs > 70  # a mask added by clicks after the removal: a colour no other mask has
    page.execute_script("""Object.assign(window.sam2page.state, {clickPrompt: {points: [[75, 5]], labels: [1]},
        clickAnswer: {results: [{masks: [arguments[0]], iou_predictions: [0.9]}]}}); keepClickMask()""", rle(added))
    assert page_state(page, "colours")[:2] == [colours[0], colours[2]]
    assert page_state(page, "colours")[2] not in colours
    row(2).click()
    remove.click()
    expected = np.zeros((height, width), dtype=np.int64)
    expected[masks[0]] = 1
    expected[masks[2]] = 2  # the smaller, on top
    assert page.execute_script("return Array.from(window.sam2page.state.labels)") == expected.T.ravel().tolist()
    row(0).click()
    ActionChains(page).send_keys(Keys.DELETE).perform()
    assert json.loads(page.execute_script("return window.sam2page.studyJson()")) == {"mask_0": rle(masks[2])}
    assert status(page) == "Mask 0 removed; mask 1 is now 0. 1 mask from the server and 0 added by clicks."
    # The keyboard stays in the list, on the row now where the removed one was.
    assert page.execute_script("return document.activeElement.dataset.index") == "0"
    row(0).click()
    ActionChains(page).send_keys(Keys.DELETE).perform()
    assert page.find_element(By.ID, "mask-list").text.endswith("Every mask was removed.")


def test_a_removed_mask_is_put_back_at_its_number_by_ctrl_z_or_the_button(page, tmp_path):
    """Ctrl+Z in the every-mask tool, or "Put back the removed mask", puts the mask removed last
    back at its number, with its record, colour and category, selected (the keyboard on its row
    where it was in the list); every removal put back, the page holds the server's masks again,
    unedited. Not in the click tool (its Ctrl+Z takes back clicks), nor after other masks came."""
    width, height = SMALL
    ys, xs = np.mgrid[:height, :width]
    masks = [xs < 30, (xs - 45) ** 2 + (ys - 24) ** 2 < 100, ys < 10]
    answers = {**stub_answers(), "/upload_rle": [200, [coco_record(mask) for mask in masks], 0]}
    study = lambda: page.execute_script("return window.sam2page.studyJson()")  # noqa: E731
    labels = lambda: page.execute_script("return Array.from(window.sam2page.state.labels)")  # noqa: E731
    row = lambda index: page.find_element(By.CSS_SELECTOR, f"#mask-list tr[data-index='{index}']")  # noqa: E731
    ctrl_z = lambda: ActionChains(page).key_down(Keys.CONTROL).send_keys("z").key_up(Keys.CONTROL).perform()  # noqa
    put_back = page.find_element(By.ID, "put-back-mask")
    with stubbed_fetch(page, answers):
        open_image(page, small_image(tmp_path, "three.png"))
        wait_for(page, lambda d: len(page_state(d, "annotations")) == 3, timeout=10)
        page.execute_script("window.sam2page.state.annotations[1].category = 'wheel'")
        shown = [study(), labels(), page_state(page, "colours"), page_state(page, "annotations")]
        assert not put_back.is_enabled()
        row(1).click()
        page.find_element(By.ID, "remove-mask").click()
        row(0).click()
        ActionChains(page).send_keys(Keys.DELETE).perform()  # the keyboard in the list
        assert json.loads(study()) == {"mask_0": rle(masks[2])} and put_back.is_enabled()
        ctrl_z()
        assert status(page) == "Mask 0 put back; mask 0 is now 1. 2 masks from the server and 0 added by clicks."
        assert json.loads(study()) == {"mask_0": rle(masks[0]), "mask_1": rle(masks[2])}
        assert page_state(page, "selected") == 0
        assert page.execute_script("return document.activeElement.dataset.index") == "0"

        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
        wait_for(page, lambda d: page_state(d, "imageId") == "stub", timeout=10)
        assert not put_back.is_enabled()
        ctrl_z()  # the click tool's: no click to take back, no mask put back
        assert len(page_state(page, "annotations")) == 2
        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").click()
        put_back.click()
        assert status(page) == "Mask 1 put back; mask 1 is now 2. 3 masks from the server and 0 added by clicks."
        assert [study(), labels(), page_state(page, "colours"), page_state(page, "annotations")] == shown
        assert page_state(page, "annotations")[1]["category"] == "wheel" and page_state(page, "selected") == 1
        assert not put_back.is_enabled() and not page.execute_script("return masksEdited()")
        ctrl_z()  # nothing left to put back
        assert status(page).startswith("Mask 1 put back") and len(page_state(page, "annotations")) == 3

        row(2).click()
        ActionChains(page).send_keys(Keys.DELETE).perform()
        open_image(page, small_image(tmp_path, "again.png"))  # other masks: those of before are not put back
        wait_for(page, lambda d: d.switch_to.alert.text.startswith("Open another image? The masks added, removed"))
        page.switch_to.alert.accept()
        wait_for(page, lambda d: len(page_state(d, "annotations")) == 3, timeout=10)
        assert not put_back.is_enabled()
        ctrl_z()
        assert len(page_state(page, "annotations")) == 3


def test_delete_in_the_list_removes_the_row_the_keyboard_is_on(page):
    """A row selected, then the arrow keys to another: Delete removed the selected mask, out of
    sight of the row the keyboard was on (and outlined)."""
    width, height = 80, 60
    ys, xs = np.mgrid[:height, :width]
    masks = [xs < 40, (xs - 60) ** 2 + (ys - 30) ** 2 < 100, ys < 10]
    page.execute_script("window.sam2page.showAnswer(arguments[0], arguments[1], arguments[2])",
                        json.dumps([coco_record(mask) for mask in masks]), width, height)
    page.find_element(By.CSS_SELECTOR, "#mask-list tr[data-index='0']").click()
    ActionChains(page).send_keys(Keys.ARROW_DOWN).perform()
    on = int(page.execute_script("return document.activeElement.dataset.index"))  # the list's next row
    assert on != 0 and page_state(page, "selected") == 0
    ActionChains(page).send_keys(Keys.DELETE).perform()
    left = [mask for index, mask in enumerate(masks) if index != on]
    assert json.loads(page.execute_script("return window.sam2page.studyJson()")) == {
        f"mask_{index}": rle(mask) for index, mask in enumerate(left)}
    assert status(page).startswith(f"Mask {on} removed")


def ax_nodes(driver, role: str) -> list[dict]:
    """The nodes of a role in Chromium's accessibility tree (what a screen reader is given)."""
    return [node for node in driver.execute_cdp_cmd("Accessibility.getFullAXTree", {})["nodes"]
            if node.get("role", {}).get("value") == role and not node.get("ignored")]


def ax_true(node: dict, name: str) -> bool:
    return any(p["name"] == name and p["value"].get("value") in (True, "true") for p in node.get("properties", []))


def focused(driver) -> str:
    """What the keyboard is on: a row's mask number, else the element's id, else its tag."""
    return driver.execute_script("const e = document.activeElement;"
                                 "return e.dataset.index !== undefined ? `row ${e.dataset.index}` : e.id || e.tagName")


def test_screen_readers_hear_the_selected_row_and_the_keyboard_stays_in_the_list_after_a_removal(page):
    """The list is a grid named Masks whose selected row says so; "Remove the selected mask" (its
    button turned off by the removal) and Delete on the last row left the keyboard on <body>."""
    width, height = 80, 60
    ys, xs = np.mgrid[:height, :width]
    masks = [xs < 40, (xs - 60) ** 2 + (ys - 30) ** 2 < 100, ys < 10]
    page.execute_script("window.sam2page.showAnswer(arguments[0], arguments[1], arguments[2])",
                        json.dumps([coco_record(mask) for mask in masks]), width, height)
    [grid] = ax_nodes(page, "grid")
    assert grid["name"]["value"] == "Masks"
    assert not any(ax_true(row, "selected") for row in ax_nodes(page, "row"))
    row = lambda index: page.find_element(By.CSS_SELECTOR, f"#mask-list tr[data-index='{index}']")  # noqa: E731
    page.execute_script("arguments[0].focus()", row(1))
    ActionChains(page).send_keys(Keys.ENTER).perform()
    assert [ax_true(node, "selected") for node in ax_nodes(page, "row")].count(True) == 1
    assert row(1).get_attribute("aria-selected") == "true" and row(0).get_attribute("aria-selected") == "false"
    at = page.execute_script("return arguments[0].sectionRowIndex", row(1))
    page.find_element(By.ID, "remove-mask").send_keys(Keys.ENTER)  # the keyboard on the button
    assert len(page_state(page, "annotations")) == 2
    shown_at = page.execute_script("return document.activeElement.sectionRowIndex")
    assert focused(page).startswith("row ") and shown_at == min(at, 1)  # the row where the removed one was
    # The mouse's click on the button takes no focus to the list (its row's mask was shown as
    # hovered), also once the keyboard has been on the button (where it shows :focus-visible).
    row(0).click()
    page.find_element(By.ID, "remove-mask").send_keys(Keys.SHIFT)
    page.find_element(By.ID, "remove-mask").click()
    assert len(page_state(page, "annotations")) == 1
    assert not focused(page).startswith("row ") and page_state(page, "hovered") == -1
    page.execute_script("arguments[0].focus()", row(0))
    ActionChains(page).send_keys(Keys.DELETE).perform()
    assert page.find_element(By.ID, "mask-list").text.endswith("Every mask was removed.")
    assert focused(page) == "mask-list"


PASTE = """
    const canvas = Object.assign(document.createElement("canvas"), {width: 64, height: 48});
    canvas.toBlob((blob) => {
      const data = new DataTransfer();
      data.items.add(new File([blob], "pasted.png", {type: "image/png"}));
      document.activeElement.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true}));
    });"""  # an image pasted where the keyboard is


def test_in_the_click_tool_the_list_is_no_tab_stop_and_its_buttons_leave_the_keyboard_on_the_tool(page, tmp_path):
    """The list rests in the click tool (its rows do nothing): no row is a Tab stop, each says it
    is off; "Add to masks" and "Clear clicks", which turn themselves off, left the keyboard on
    <body>. A paste while the keyboard is in the list brings it back to the new image's list."""
    with stubbed_fetch(page, stub_answers()):
        a_click_answered(page, small_image(tmp_path, "tool.png"))
        rows = page.find_elements(By.CSS_SELECTOR, "#mask-list tbody tr")
        assert rows and all(r.get_attribute("tabindex") == "-1" and r.get_attribute("aria-disabled") for r in rows)
        page.find_element(By.ID, "keep-click").send_keys(Keys.ENTER)
        wait_for(page, lambda d: status(d).startswith("Added as mask 1"), timeout=10)
        on_tool = "const e = document.activeElement; return e.name === 'tool' && e.value"
        assert page.execute_script(on_tool) == "click"
        pointer(page, "pointerdown", 30, 20)
        pointer(page, "pointerup", 30, 20)
        page.find_element(By.ID, "clear-clicks").send_keys(Keys.ENTER)
        assert page.execute_script(on_tool) == "click"
        pointer(page, "pointerdown", 30, 20)
        pointer(page, "pointerup", 30, 20)
        wait_for(page, lambda d: d.find_element(By.ID, "keep-click").is_enabled(), timeout=10)
        page.find_element(By.ID, "keep-click").send_keys(Keys.SHIFT)  # the keyboard on it, then
        page.find_element(By.ID, "keep-click").click()  # the mouse's click: an arrow key then changed the tool
        assert page.execute_script(on_tool) is False
        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").click()
        stops = page.find_elements(By.CSS_SELECTOR, "#mask-list tbody tr[tabindex='0']")
        assert len(stops) == 1 and not stops[0].get_attribute("aria-disabled")
        page.execute_script("arguments[0].focus()", stops[0])
        page.execute_script("window.confirm = () => true")  # the mask added is let go
        page.execute_script(PASTE)
        wait_for(page, lambda d: page_state(d, "name") == "pasted" and status(d).startswith("1 mask in"), timeout=10)
    assert focused(page) == "row 0"
    # Not where the pointer went elsewhere while the pasted image was segmented.
    answers = stub_answers()
    answers["/upload_rle"][2] = "held"
    with stubbed_fetch(page, answers):
        page.execute_script(PASTE)
        wait_for(page, lambda d: d.execute_script("return typeof window.release") == "function", timeout=10)
        ActionChains(page).click(page.find_element(By.TAG_NAME, "h1")).perform()
        page.execute_script("window.release()")
        wait_for(page, lambda d: status(d).startswith("1 mask in"), timeout=10)
    assert focused(page) == "BODY" and page_state(page, "hovered") == -1


def test_the_page_fits_mid_width_windows_and_phones_and_its_spinner_rests_for_reduced_motion(page):
    """Windows 761 to 850 px wide scrolled sideways before an image (the viewer's least width
    beside the list); a long file name in the status line did on a phone; the spinner turned
    for those who ask for less motion."""
    wide = "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    try:
        for width in (770, 800, 850):
            page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                 {"width": width, "height": 450, "deviceScaleFactor": 1, "mobile": False})
            assert page.execute_script(wide) <= 0, width
        page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                             {"width": 320, "height": 640, "deviceScaleFactor": 1, "mobile": True})
        page.execute_cdp_cmd("Emulation.setEmulatedMedia",
                             {"features": [{"name": "prefers-reduced-motion", "value": "reduce"}]})
        page.execute_script("window.ending = busy('Segmenting IMG_20240101_123456789_HDR_panorama_final_v2.jpg…')")
        assert page.execute_script(wide) <= 0
        spinning = "return getComputedStyle(document.getElementById('spinner')).animationName"
        assert page.execute_script(spinning) == "none"
        page.execute_script("window.ending()")
    finally:
        page.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def masks_shown(driver) -> np.ndarray:
    """Where the visible layers of masks (every mask's, the added masks') paint, (height, width):
    what the viewer and the overlay PNG show of masks."""
    width, height, alphas = driver.execute_script("""
        const layers = ['mask-canvas', 'added-canvas'].map((id) => document.getElementById(id))
          .filter((c) => getComputedStyle(c).visibility !== 'hidden');
        const c = document.getElementById('mask-canvas');
        return [c.width, c.height, layers.map((layer) => Array.from(
          layer.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 === 3)))]""")
    return np.array(alphas, dtype=np.uint8).reshape(-1, height, width).any(axis=0)


def overlay_painted(driver) -> np.ndarray:
    """Where the overlay PNG's picture is not transparent, (height, width)."""
    width, height, alpha = driver.execute_script(
        "const c = overlayCanvas();"
        "return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
        ".filter((_, i) => i % 4 === 3))]")
    return np.array(alpha, dtype=np.uint8).reshape(height, width) > 0


def test_the_click_tool_shows_the_masks_added_by_clicks_and_the_server_s_rest(page):
    """In the click tool the masks shown are what is labelled so far, the masks added by clicks,
    not the server's (they rest, under the mask of the clicks); the every-mask tool shows them
    all. The overlay PNG is what is shown (here over a blank image: where it is not transparent)."""
    width, height = 80, 60
    ys, xs = np.mgrid[:height, :width]
    found = xs < 40  # the server's
    added = (xs > 50) & (ys > 20)
    page.execute_script("window.sam2page.showAnswer(arguments[0], arguments[1], arguments[2])",
                        json.dumps([coco_record(found)]), width, height)
    page.execute_script("window.sam2page.state.imageId = 'stub'")  # already encoded: no /embed asked
    assert np.array_equal(masks_shown(page), found)
    page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
    assert not masks_shown(page).any()  # nothing added yet: the server's rest
    page.execute_script("""Object.assign(window.sam2page.state, {clickPrompt: {points: [[70, 40]], labels: [1]},
        clickAnswer: {results: [{masks: [arguments[0]], iou_predictions: [0.9]}]}}); keepClickMask()""", rle(added))
    assert np.array_equal(masks_shown(page), added)
    assert np.array_equal(overlay_painted(page), added)
    page.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").click()
    assert np.array_equal(masks_shown(page), found | added)
    assert np.array_equal(overlay_painted(page), found | added)
    page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
    assert np.array_equal(masks_shown(page), added)


def overlay_alpha(driver) -> np.ndarray:
    """The overlay PNG's picture's alpha, (height, width)."""
    width, height, alpha = driver.execute_script(
        "const c = overlayCanvas();"
        "return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
        ".filter((_, i) => i % 4 === 3))]")
    return np.array(alpha, dtype=np.int32).reshape(height, width)


def test_masks_shown_fades_the_masks_on_the_page_and_in_the_overlay_png(page):
    """To see the picture under the masks: "Masks shown" fades every mask's layer and the added
    masks' (the page's canvases and the overlay PNG alike, here over a blank image), by the
    keyboard too; the hovered mask is drawn as before."""
    width, height = 80, 60
    ys, xs = np.mgrid[:height, :width]
    found = xs < 40
    page.execute_script("window.sam2page.showAnswer(arguments[0], arguments[1], arguments[2])",
                        json.dumps([coco_record(found)]), width, height)
    full = overlay_alpha(page)
    assert (full[found] > 100).all() and not full[~found].any()
    control = page.find_element(By.ID, "mask-opacity")
    control.send_keys(Keys.END)  # at most already: nothing changes
    assert np.array_equal(overlay_alpha(page), full)
    for _ in range(10):
        control.send_keys(Keys.ARROW_LEFT)  # 5% a step
    assert page.find_element(By.ID, "mask-opacity-value").text == "50%"
    assert page.execute_script("return ['mask-canvas', 'added-canvas'].map("
                               "(id) => getComputedStyle(document.getElementById(id)).opacity)") == ["0.5", "0.5"]
    half = overlay_alpha(page)
    assert np.abs(half[found] - full[found] / 2).max() <= 1 and not half[~found].any()
    control.send_keys(Keys.HOME)
    assert not overlay_painted(page).any() and control.get_attribute("aria-valuetext") == "0%"
    assert np.array_equal(masks_shown(page), found)  # the masks are there, only not shown
    page.execute_script("setHovered(0)")
    assert highlight_alpha(page) > 0  # a hovered mask still shows itself
    control.send_keys(Keys.END)


def test_a_hovered_mask_is_painted_with_its_outline(page):
    """paintMask, which draws the hovered, selected and clicked masks: the mask's pixels at alpha
    170, those with a neighbour (of 4) outside it opaque, nothing else; on masks whose runs cross
    columns, touch the image's edges, have holes, or are one pixel or a diagonal line."""
    width, height = 61, 47
    ys, xs = np.mgrid[:height, :width]
    masks = [((xs - 30) ** 2 / 400 + (ys - 20) ** 2 / 200 < 1) & ((xs - 30) ** 2 + (ys - 20) ** 2 > 16),
             (xs < 20) | (ys > 40),  # runs down whole columns and across them, on every edge
             (xs == 7) & (ys == 46),
             xs == ys,
             np.ones((height, width), dtype=bool)]
    page.execute_script("window.sam2page.showAnswer(arguments[0], arguments[1], arguments[2])",
                        json.dumps([coco_record(mask) for mask in masks]), width, height)
    for index, mask in [*enumerate(masks), (0, masks[0])]:  # the last one from the pictures kept
        alpha = page.execute_script("""
            const c = document.createElement("canvas"); c.width = arguments[1]; c.height = arguments[2];
            const context = c.getContext("2d");
            paintMask(context, window.sam2page.state.counts[arguments[0]], [40, 90, 255]);
            return Array.from(context.getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 === 3));""",
                                    index, width, height)
        padded = np.pad(mask, 1)
        inner = mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        expected = np.where(inner, 170, np.where(mask, 255, 0))
        assert np.array_equal(np.array(alpha).reshape(height, width), expected), index


def test_hovering_back_to_a_large_mask_reuses_its_picture(page):
    """A mask's picture is made once while it stays among those painted last (up to twice the
    image's pixels in all): hovering from the background to an object and back does not make the
    background's again (on a 4000x3000 image, a tenth of a second or more each time)."""
    width, height = 80, 60
    ys, xs = np.mgrid[:height, :width]
    objects = [(xs - 10 * k - 10) ** 2 + (ys - 30) ** 2 < 16 for k in range(2)]
    background = ~np.any(objects, axis=0)
    halves = [xs < width // 2, xs >= width // 2]  # half the image each: two of them and the background are too many
    page.execute_script("window.sam2page.showAnswer(arguments[0], arguments[1], arguments[2])",
                        json.dumps([coco_record(mask) for mask in [background, *objects, *halves]]), width, height)
    page.execute_script("""
        window.realMaskPicture = window.maskPicture;
        window.made = [];
        window.maskPicture = (counts, rgb) => {
          window.made.push(window.sam2page.state.counts.indexOf(counts));
          return window.realMaskPicture(counts, rgb);
        };""")
    try:
        for index in [0, 1, 0, 2, 0, 1, -1]:
            page.execute_script("setHovered(arguments[0])", index)
        assert page.execute_script("return window.made") == [0, 1, 2]
        kept = ("return window.sam2page.state.painted.reduce("
                "(sum, p) => sum + p.picture.canvas.width * p.picture.canvas.height, 0)")
        assert page.execute_script(kept) <= 2 * width * height
        page.execute_script("window.made = []; for (const i of [3, 4, 0]) setHovered(i);")
        assert page.execute_script("return window.made") == [3, 4, 0]  # the background made again
        assert page.execute_script(kept) <= 2 * width * height
    finally:
        page.execute_script("window.maskPicture = window.realMaskPicture;")


def test_the_live_status_says_what_runs_once_while_the_seconds_tick_beside_it(page, tmp_path):
    """Screen readers read out each change of the live region: while the server works, it keeps
    its words; the seconds tick on screen, outside it."""
    live = lambda: page.execute_script("return document.getElementById('status-text').textContent")  # noqa: E731
    shown = lambda: page.find_element(By.ID, "status").text  # noqa: E731
    with stubbed_fetch(page, {"/upload_rle": [200, [], None]}):  # no answer comes
        open_image(page, small_image(tmp_path, "slow.png"))
        wait_for(page, lambda d: "slow.png" in live(), timeout=10)
        before = live(), shown()
        wait_for(page, lambda d: shown() != before[1], timeout=10)  # the seconds ticked
        assert live() == before[0]


def test_a_file_the_browser_cannot_show_is_not_sent(page, tmp_path):
    """A TIFF (Pillow reads it, Chromium does not show it): the page says so at once and sends
    nothing, as no mask could be drawn over it."""
    tiff = tmp_path / "scan.tiff"
    Image.new("RGB", SMALL, "#4a7").save(tiff)
    with stubbed_fetch(page, {"/upload_rle": [200, [], 0]}):
        open_image(page, tiff)
        wait_for(page, lambda d: d.find_element(By.ID, "error").is_displayed(), timeout=10)
        assert fetch_log(page) == []
        assert "cannot show scan.tiff" in page.find_element(By.ID, "error").text


XMP_ORIENTATION = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                   '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="{}"/></rdf:RDF>'
                   '</x:xmpmeta>')


def object_picture() -> Image.Image:
    """A picture with an object: a red rectangle, near a corner."""
    image = Image.new("RGB", (160, 120), (40, 90, 70))
    ImageDraw.Draw(image).rectangle([20, 15, 64, 50], fill=(220, 40, 40))
    return image


def turned_image(path: Path, orientation: int | None, xmp: int | None = None, **options) -> np.ndarray:
    """Writes an image with an object (a red rectangle, near a corner) and this EXIF orientation
    (None: no EXIF), and this orientation in XMP (None: no XMP); answers its pixels as the server
    sees them, turned by the orientation (Pillow's exif_transpose)."""
    image = object_picture()
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif
    if xmp is not None and path.suffix == ".png":
        options["pnginfo"] = PngImagePlugin.PngInfo()
        options["pnginfo"].add_itxt("XML:com.adobe.xmp", XMP_ORIENTATION.format(xmp))
    elif xmp is not None:
        options["xmp"] = XMP_ORIENTATION.format(xmp).encode()
    image.save(path, **options)
    with Image.open(path) as saved:
        return np.asarray(ImageOps.exif_transpose(saved).convert("RGB"))


def shown_image(driver) -> np.ndarray:
    """The page's image canvas, as RGB."""
    url = driver.execute_script("return document.getElementById('image-canvas').toDataURL('image/png')")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
        return np.asarray(image.convert("RGB"))


def open_and_show(driver, path: Path) -> None:
    open_image(driver, path)
    wait_for(driver, lambda d: page_state(d, "name") == path.stem and page_state(d, "width") > 0, timeout=10)


def test_every_exif_orientation_is_shown_as_the_server_turns_it(page, tmp_path):
    """The server turns every image by its EXIF orientation; Chromium turns JPEG and PNG, not
    WebP: the page shows each as the server sees it."""
    cases = [("webp", orientation, {"lossless": True}) for orientation in range(1, 9)]
    cases += [("png", 6, {}), ("jpg", 6, {"quality": 95})]
    with stubbed_fetch(page, {"/upload_rle": [200, [], None]}):  # the picture alone: no answer comes
        for suffix, orientation, options in cases:
            path = tmp_path / f"turned{orientation}.{suffix}"
            expected = turned_image(path, orientation, **options)
            open_and_show(page, path)
            shown = shown_image(page)
            assert shown.shape == expected.shape, (suffix, orientation)
            difference = float(np.abs(shown.astype(int) - expected).mean())
            assert difference < (3 if suffix == "jpg" else 0.5), (suffix, orientation, difference)


def test_an_xmp_orientation_is_shown_as_the_server_turns_it(page, tmp_path):
    """Pillow also turns an image by XMP's tiff:Orientation, where EXIF has none (and only there);
    browsers turn by EXIF alone: the page shows each as the server sees it."""
    cases = [(suffix, None, 6, options) for suffix, options in
             (("jpg", {"quality": 95}), ("png", {}), ("webp", {"lossless": True}))]
    cases += [("jpg", None, 3, {"quality": 95}), ("webp", None, 8, {"lossless": True}),
              ("jpg", 1, 6, {"quality": 95})]  # EXIF's orientation 1 wins over XMP's: not turned
    with stubbed_fetch(page, {"/upload_rle": [200, [], None]}):  # the picture alone: no answer comes
        for index, (suffix, orientation, xmp, options) in enumerate(cases):
            path = tmp_path / f"xmp{index}.{suffix}"
            expected = turned_image(path, orientation, xmp, **options)
            assert expected.shape[:2] == ((160, 120) if xmp in (6, 8) and orientation is None else (120, 160))
            open_and_show(page, path)
            shown = shown_image(page)
            assert shown.shape == expected.shape, (suffix, orientation, xmp)
            difference = float(np.abs(shown.astype(int) - expected).mean())
            assert difference < (3 if suffix == "jpg" else 0.5), (suffix, orientation, xmp, difference)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_a_turned_webp_s_masks_and_clicks_line_up_with_its_picture(page, tmp_path):
    """A WebP turned by its EXIF orientation (3: upside down; 6: a quarter turn): the server's
    mask of its object covers the object where the page draws it, and a click on the object as
    drawn gives the object's mask."""
    for orientation in (3, 6):
        path = tmp_path / f"object{orientation}.webp"
        turned_image(path, orientation, lossless=True)
        open_and_show(page, path)
        wait_for(page, lambda d: page_state(d, "labels !== null") or d.find_element(By.ID, "error").is_displayed())
        assert not page.find_element(By.ID, "error").is_displayed(), page.find_element(By.ID, "error").text
        shown = shown_image(page)
        red = (shown[..., 0] > 150) & (shown[..., 1] < 100)
        masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in page_state(page, "annotations")]
        assert max(mask_iou(mask, red) for mask in masks) > 0.9, orientation

        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
        wait_for(page, lambda d: page_state(d, "imageId") is not None)
        ys, xs = np.nonzero(red)
        canvas = page.find_element(By.ID, "highlight-canvas")
        ActionChains(page).move_to_element_with_offset(canvas, *screen_offset(page, xs.mean(), ys.mean())).click().perform()
        wait_for(page, lambda d: page_state(d, "clickAnswer") is not None)
        x, y = page_state(page, "clickPrompt")["points"][0]
        assert red[round(y), round(x)], orientation
        answer = page_state(page, "clickAnswer")["results"][0]["masks"][0]
        mask = mask_utils.decode(mask_utils.frPyObjects(answer, *answer["size"])).astype(bool)
        assert mask_iou(mask, red) > 0.9, orientation
        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").click()


def test_the_page_has_a_security_policy_and_logs_no_error(browser, server, tmp_path):
    """GET / sends a Content-Security-Policy that allows the page's own files and requests
    alone; under it, opening an image and using the mask list puts no error in the console
    (no favicon request answered 404, no inline style refused)."""
    with urllib.request.urlopen(server + "/") as response:
        policy = response.headers["Content-Security-Policy"]
    assert policy and "default-src 'none'" in policy and "script-src 'self'" in policy
    browser.get_log("browser")  # earlier pages' messages
    browser.get(server + "/")
    wait_for(browser, lambda d: "micro" in d.find_element(By.ID, "server-info").text)
    path = tmp_path / "object.png"
    turned_image(path, 1)
    open_image(browser, path)
    wait_for(browser, lambda d: page_state(d, "labels !== null"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#mask-list tbody tr")
    assert rows[0].find_element(By.CLASS_NAME, "swatch").value_of_css_property("background-color") != "rgba(0, 0, 0, 0)"
    rows[0].click()
    rows[0].click()
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []


def test_the_image_is_fitted_again_when_an_error_shows_or_goes(page, tmp_path):
    """A tall image fills the window's height; an error line above it pushes it down, so it is
    fitted again, and once the error goes, again to the whole height."""
    tall = (48, 400)
    bottom = lambda: page.execute_script(  # noqa: E731
        "return document.getElementById('image-canvas').getBoundingClientRect().bottom - window.innerHeight")
    canvas = page.find_element(By.ID, "highlight-canvas")
    with stubbed_fetch(page, stub_answers(segment_status=500, size=tall)):
        open_image(page, small_image(tmp_path, "tall.png", tall))
        wait_for(page, lambda d: page_state(d, "labels !== null"), timeout=10)
        height = canvas.size["height"]
        assert -30 < bottom() < 0  # as tall as the window allows
        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
        wait_for(page, lambda d: page_state(d, "imageId") == "stub", timeout=10)
        ActionChains(page).move_to_element(canvas).click().perform()
        wait_for(page, lambda d: d.find_element(By.ID, "error").is_displayed(), timeout=10)
        assert bottom() < 0 and canvas.size["height"] < height
    with stubbed_fetch(page, stub_answers(size=tall)):
        ActionChains(page).move_to_element(canvas).click().perform()
        wait_for(page, lambda d: not d.find_element(By.ID, "error").is_displayed(), timeout=10)
        assert -30 < bottom() < 0 and canvas.size["height"] > height - 5


def test_a_transparent_image_is_shown_over_white(page, tmp_path):
    """Transparent pixels are shown (and drawn in the overlay PNG) over white, as the server
    segments them."""
    image = Image.new("RGBA", (80, 60), (0, 0, 0, 0))
    ImageDraw.Draw(image).rectangle([10, 10, 40, 30], fill=(220, 40, 40, 255))
    ImageDraw.Draw(image).rectangle([50, 10, 70, 50], fill=(220, 40, 40, 128))
    path = tmp_path / "transparent.png"
    image.save(path)
    expected = np.asarray(Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB"))
    with stubbed_fetch(page, {"/upload_rle": [200, [], None]}):  # the picture alone
        open_and_show(page, path)
        assert np.abs(shown_image(page).astype(int) - expected).max() <= 2


def test_the_status_says_what_runs_in_either_tool_and_what_failed(page, tmp_path):
    """One status line, two tools: while a request runs it says so in either tool (switching
    tools does not bring back another image's figures); once it ends, each tool's own line; a
    refused upload says so in the click tool too."""
    tool = lambda name: page.find_element(By.CSS_SELECTOR, f"input[name=tool][value={name}]").click()  # noqa: E731
    answers = stub_answers()
    answers["/upload_rle"][2] = "held"
    with stubbed_fetch(page, answers):
        open_image(page, small_image(tmp_path, "held.png"))
        wait_for(page, lambda d: "/upload_rle" in fetch_log(d), timeout=10)
        for name in ("click", "everything", "click"):
            tool(name)
            assert status(page) == "Segmenting held.png…", name
        page.execute_script("window.release()")
        wait_for(page, lambda d: page_state(d, "imageId") == "stub", timeout=10)  # encoded for the click tool
        assert status(page).startswith("Image encoded in ")
        tool("everything")
        assert status(page).startswith("1 mask in ")
    with stubbed_fetch(page, {"/upload_rle": [413, {"error": "as the server says"}, 0]}):
        tool("click")
        open_image(page, small_image(tmp_path, "refused.png"))
        wait_for(page, lambda d: d.find_element(By.ID, "error").is_displayed(), timeout=10)
        assert status(page) == "No masks for this image: open another." and not page.find_element(By.ID, "spinner").is_displayed()
        tool("everything")
        assert status(page) == "No masks for this image: open another."
        page.find_element(By.ID, "sort-by").send_keys("p")  # sorted by predicted IoU: still no list of masks
        assert page.find_elements(By.CSS_SELECTOR, "#mask-list tbody tr") == []
    with stubbed_fetch(page, {"/upload_rle": [503, {"error": "the queue is full"}, 0]}):  # not the image's fault
        open_image(page, small_image(tmp_path, "busy.png"))
        wait_for(page, lambda d: status(d).startswith("No masks yet"), timeout=10)
        assert status(page) == "No masks yet: open the image again, or Segment again (under Filters), to try again."


def in_the_click_tool(page, image: Path):
    """Opens the image, takes the click tool once the (stubbed) server has encoded it: the top
    canvas and its size on screen."""
    open_image(page, image)
    page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
    wait_for(page, lambda d: page_state(d, "imageId") == "stub", timeout=10)
    canvas = page.find_element(By.ID, "highlight-canvas")
    return canvas, canvas.rect["width"], canvas.rect["height"]


def a_click_answered(page, image: Path) -> None:
    """in_the_click_tool, then a click on the stub's square, its mask answered."""
    in_the_click_tool(page, image)
    pointer(page, "pointerdown", 30, 20)
    pointer(page, "pointerup", 30, 20)
    wait_for(page, lambda d: page_state(d, "clickAnswer") is not None, timeout=10)


def test_a_box_reaches_the_image_s_far_edges_and_a_drag_along_an_edge_or_let_go_of_is_no_box(page, tmp_path):
    with stubbed_fetch(page, stub_answers()):
        canvas, width, height = in_the_click_tool(page, small_image(tmp_path, "edges.png"))
        ActionChains(page).move_to_element_with_offset(canvas, 0, 0).click_and_hold() \
            .move_by_offset(width / 2 + 30, height / 2 + 30).release().perform()  # past the bottom right corner
        wait_for(page, lambda d: page_state(d, "clickPrompt") is not None, timeout=10)
        x0, y0, x1, y1 = page_state(page, "box")
        assert (x1, y1) == SMALL and 0 < x0 < x1 and 0 < y0 < y1
        segments = fetch_log(page).count("/segment")
        # From the top row's first tenth of a pixel, up and out of the image: a box 0.1 pixel high.
        ActionChains(page).move_to_element_with_offset(canvas, -width / 4, -height / 2 + 0.5).click_and_hold() \
            .move_by_offset(40, -60).release().perform()
        time.sleep(0.3)
        assert page_state(page, "box") == [x0, y0, x1, y1] and fetch_log(page).count("/segment") == segments
        # Escape while drawing a box: no box, none drawn.
        ActionChains(page).move_to_element_with_offset(canvas, 0, 0).click_and_hold().move_by_offset(10, 10).perform()
        assert page_state(page, "dragBox") is not None
        ActionChains(page).send_keys(Keys.ESCAPE).release().perform()
        time.sleep(0.3)
        assert page_state(page, "box") == [x0, y0, x1, y1] and fetch_log(page).count("/segment") == segments
        assert page_state(page, "dragBox") is None


def test_a_box_past_a_strip_s_shown_part_ends_at_its_edge_and_other_buttons_and_files_ask_first(page, tmp_path):
    """A box dragged past the visible edge of a scrolled strip reached into the part not shown
    (its outline stopped at the edge); a middle (or back) button added a point; another image
    opened dropped the masks added without asking."""
    with stubbed_fetch(page, stub_answers(size=(4000, 40))):
        in_the_click_tool(page, small_image(tmp_path, "strip.png", size=(4000, 40)))
        pointer(page, "pointerdown", 100, 20)
        edge = page.execute_script("""
            const viewer = document.getElementById("viewer"), frame = viewer.getBoundingClientRect();
            const rect = document.getElementById("highlight-canvas").getBoundingClientRect();
            const right = frame.left + viewer.clientLeft + viewer.clientWidth;
            window.dispatchEvent(new PointerEvent("pointerup", {
              clientX: right + 200, clientY: rect.top + rect.height * 0.9, pointerId: 1, pointerType: "mouse",
              isPrimary: true}));
            return ((right - rect.left) * 4000) / rect.width;""")
        assert edge < 3000  # the strip is cut by the viewer
        wait_for(page, lambda d: page_state(d, "box") is not None, timeout=10)
        assert abs(page_state(page, "box")[2] - edge) <= 0.2, (page_state(page, "box"), edge)
        clicks = page_state(page, "clicks")
        for button in (1, 3, 4):  # middle, back, forward
            for kind in ("pointerdown", "pointerup"):
                page.execute_script("""
                    const rect = document.getElementById("highlight-canvas").getBoundingClientRect();
                    document.getElementById("highlight-canvas").dispatchEvent(new PointerEvent(arguments[0], {
                      clientX: rect.left + 5, clientY: rect.top + 5, button: arguments[1], pointerId: 1,
                      pointerType: "mouse", isPrimary: true, bubbles: true, cancelable: true}));""", kind, button)
        assert page_state(page, "clicks") == clicks
        # A mask added is work another image would lose: asked first.
        wait_for(page, lambda d: page_state(d, "clickAnswer") is not None, timeout=10)
        page.find_element(By.ID, "keep-click").click()
        open_image(page, small_image(tmp_path, "next.png"))
        wait_for(page, lambda d: "Open another image?" in d.switch_to.alert.text, timeout=10)
        page.switch_to.alert.dismiss()
        assert page_state(page, "annotations.length") == 2 and page_state(page, "width") == 4000
        with stubbed_fetch(page, stub_answers()):  # the next image's masks
            open_image(page, small_image(tmp_path, "next.png"))
            wait_for(page, lambda d: "Open another image?" in d.switch_to.alert.text, timeout=10)
            page.switch_to.alert.accept()
            wait_for(page, lambda d: page_state(d, "width") == SMALL[0] and page_state(d, "labels !== null"),
                     timeout=10)
        assert page_state(page, "annotations.length") == 1 and not page.find_element(By.ID, "error").is_displayed()


def test_a_box_past_the_window_s_edge_ends_there(page, tmp_path):
    """The page scrolled so that the window cuts the image's top: a box dragged up past the
    window's edge reached into rows not shown (the pointer, captured, is followed past it)."""
    with stubbed_fetch(page, stub_answers()):
        in_the_click_tool(page, small_image(tmp_path, "cut.png"))
        try:
            page.execute_script("""
                document.body.style.paddingBottom = "3000px";
                const rect = document.getElementById("highlight-canvas").getBoundingClientRect();
                window.scrollBy(0, rect.top + rect.height / 4);""")
            pointer(page, "pointerdown", 30, 40)
            edge = page.execute_script("""
                const rect = document.getElementById("highlight-canvas").getBoundingClientRect();
                window.dispatchEvent(new PointerEvent("pointerup", {
                  clientX: rect.left + rect.width / 2, clientY: -100, pointerId: 1, pointerType: "mouse",
                  isPrimary: true}));
                return (-rect.top * window.sam2page.state.height) / rect.height;""")
            assert 5 < edge < 40  # the window cuts the image
            wait_for(page, lambda d: page_state(d, "box") is not None, timeout=10)
            assert abs(page_state(page, "box")[1] - edge) <= 0.2, (page_state(page, "box"), edge)
        finally:
            page.execute_script("document.body.style.paddingBottom = ''; window.scrollTo(0, 0);")


def test_a_finger_draws_a_box_and_taps_points(page, tmp_path):
    """Touch, as on a phone or tablet: a finger's drag draws a box (the page took mouse events
    alone, and a drag scrolled), a tap adds a point, a long press a point off the object."""
    with stubbed_fetch(page, stub_answers()):
        canvas, width, height = in_the_click_tool(page, small_image(tmp_path, "touch.png"))
        finger = ActionBuilder(page, mouse=PointerInput(interaction.POINTER_TOUCH, "finger"))
        finger.pointer_action.move_to(canvas, -width / 4, -height / 4).pointer_down() \
            .move_to(canvas, width / 4, height / 4).pointer_up()
        finger.perform()
        wait_for(page, lambda d: page_state(d, "box") is not None, timeout=10)
        x0, y0, x1, y1 = page_state(page, "box")
        assert x0 < SMALL[0] / 2 < x1 and y0 < SMALL[1] / 2 < y1 and page_state(page, "clicks") == []
        finger = ActionBuilder(page, mouse=PointerInput(interaction.POINTER_TOUCH, "finger"))
        finger.pointer_action.move_to(canvas, 0, 0).pointer_down().pointer_up()
        finger.perform()
        wait_for(page, lambda d: len(page_state(d, "clicks")) == 1, timeout=10)
        assert page_state(page, "clicks")[0]["label"] == 1
        # A long press (touch has no right click, no shift key): a point off the object.
        finger = ActionBuilder(page, mouse=PointerInput(interaction.POINTER_TOUCH, "finger"))
        finger.pointer_action.move_to(canvas, 10, 5).pointer_down().pause(0.7).pointer_up()
        finger.perform()
        wait_for(page, lambda d: len(page_state(d, "clicks")) == 2, timeout=10)
        assert [click["label"] for click in page_state(page, "clicks")] == [1, 0]


def pointer(driver, kind: str, x: float, y: float, pointer_id: int = 1, pointer_type: str = "mouse",
            target: str = "highlight-canvas", primary: bool = True) -> None:
    """A pointer event at image pixel (x, y), dispatched as the browser would (no move before it,
    as a finger's tap has none), on the element of that id; a second finger is not primary."""
    driver.execute_script("""
        const [kind, x, y, pointerId, pointerType, target, isPrimary] = arguments, s = window.sam2page.state;
        const rect = document.getElementById("highlight-canvas").getBoundingClientRect();
        const clientX = rect.left + ((x + 0.5) * rect.width) / s.width, clientY = rect.top + ((y + 0.5) * rect.height) / s.height;
        document.getElementById(target).dispatchEvent(new PointerEvent(kind, {
          clientX, clientY, pointerId, pointerType, isPrimary, bubbles: true, cancelable: true}));""",
        kind, x, y, pointer_id, pointer_type, target, primary)


def ctrl_key(driver, key: str, code: str) -> None:
    driver.execute_script("document.dispatchEvent(new KeyboardEvent('keydown', "
                          "{key: arguments[0], code: arguments[1], ctrlKey: true, bubbles: true, cancelable: true}))",
                          key, code)


def test_a_tap_selects_its_mask_and_presses_the_browser_took_back_or_a_second_finger_make_no_click(page, tmp_path):
    """A tap has no hover before it: selection read the mask hovered last (none, or one removed
    since). A press the browser cancels (a touch that became a scroll) left a press that the
    next pointer's release anywhere turned into a box; a second finger's press replaced the
    first's. Ctrl+Z is the key marked Z on every keyboard layout."""
    with stubbed_fetch(page, stub_answers()):
        open_image(page, small_image(tmp_path, "tap.png"))
        wait_for(page, lambda d: status(d).startswith("1 mask in "), timeout=10)
        pointer(page, "pointerdown", 30, 20, 7, "touch")  # the stub's square: x 20..39, y 10..29
        pointer(page, "pointerup", 30, 20, 7, "touch")
        assert page_state(page, "selected") == 0
        pointer(page, "pointerdown", 5, 40, 7, "touch")
        pointer(page, "pointerup", 5, 40, 7, "touch")
        assert page_state(page, "selected") == 0  # no mask there: the selection stays

        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
        wait_for(page, lambda d: page_state(d, "imageId") == "stub", timeout=10)
        pointer(page, "pointerdown", 10, 10, 7, "touch")
        pointer(page, "pointercancel", 10, 10, 7, "touch")
        pointer(page, "pointerup", 50, 40, 1, "mouse", target="status-text")  # a mouse let go elsewhere
        time.sleep(0.3)
        assert page_state(page, "box") is None and page_state(page, "clicks") == []
        pointer(page, "pointerdown", 10, 10, 7, "touch")
        pointer(page, "pointerdown", 50, 40, 8, "touch", primary=False)  # a second finger, while the first is down
        pointer(page, "pointerup", 50, 40, 8, "touch", primary=False)
        pointer(page, "pointerup", 10, 10, 7, "touch")
        wait_for(page, lambda d: len(page_state(d, "clicks")) == 1, timeout=10)
        assert [(c["x"], c["y"]) for c in page_state(page, "clicks")] == [(10.5, 10.5)]
        pointer(page, "pointerdown", 40, 30)
        pointer(page, "pointerup", 40, 30)
        wait_for(page, lambda d: len(page_state(d, "clicks")) == 2, timeout=10)
        ctrl_key(page, "y", "KeyZ")  # a German keyboard's Ctrl+Y: no undo
        assert len(page_state(page, "clicks")) == 2
        ctrl_key(page, "z", "KeyY")  # its Ctrl+Z
        wait_for(page, lambda d: len(page_state(d, "clicks")) == 1, timeout=10)
        ctrl_key(page, "\u044f", "KeyZ")  # a Russian keyboard's: the key a US one marks Z
        wait_for(page, lambda d: page_state(d, "clicks") == [], timeout=10)


def test_a_request_that_ends_while_the_next_file_is_read_leaves_its_spinner_and_a_strip_is_in_reach(page, tmp_path):
    """The first image's masks arriving while the second file was still being decoded stopped the
    second's spinner and put the first's figures in the status line. A strip 16384 pixels wide
    and 8 high was shown 1 pixel high (or 0): its short side is at least 32 pixels now, the
    viewer scrolling along the long one within the page."""
    answers = stub_answers()
    answers["/upload_rle"][2] = "held"
    page.execute_script("""
        window.realDecode = window.realDecode || window.createImageBitmap;
        window.createImageBitmap = (...args) => window.holdDecode
          ? new Promise((resolve) => { window.releaseDecode = () => resolve(window.realDecode(...args)); })
          : window.realDecode(...args);""")
    try:
        with stubbed_fetch(page, answers):
            open_image(page, small_image(tmp_path, "first.png"))
            wait_for(page, lambda d: "/upload_rle" in fetch_log(d), timeout=10)
            page.execute_script("window.holdDecode = true")
            open_image(page, small_image(tmp_path, "second.png"))
            wait_for(page, lambda d: d.execute_script("return !!window.releaseDecode"), timeout=10)
            page.execute_script("window.holdDecode = false; window.release()")  # the first's masks come
            wait_for(page, lambda d: "/upload_rle answered" in fetch_log(d), timeout=10)
            time.sleep(0.2)
            assert status(page) == "Segmenting second.png…" and page.find_element(By.ID, "spinner").is_displayed()
            page.execute_script("window.releaseDecode()")
            wait_for(page, lambda d: fetch_log(d).count("/upload_rle") == 2, timeout=10)
            page.execute_script("window.release()")
            wait_for(page, lambda d: status(d).startswith("1 mask in "), timeout=10)
            assert not page.find_element(By.ID, "spinner").is_displayed()
    finally:
        page.execute_script("window.createImageBitmap = window.realDecode")
    page.execute_script("window.sam2page.showAnswer('[]', 16384, 8)")
    shown = page.find_element(By.ID, "highlight-canvas").rect
    viewer = page.find_element(By.ID, "viewer").rect
    main = page.find_element(By.TAG_NAME, "main").rect
    assert shown["height"] >= 32 and shown["width"] >= 32 * 16384 / 8 - 1
    assert viewer["x"] + viewer["width"] <= main["x"] + main["width"] + 1  # within the page: the viewer scrolls
    # A tall strip scrolls in the viewer too: the page itself was 4565 px tall for a 30x4000 image,
    # the list and the hover text out of sight.
    page_height = lambda: page.execute_script("return document.documentElement.scrollHeight")  # noqa: E731
    page.execute_script("window.sam2page.showAnswer('[]', 100, 1000)")  # fitted to the window's height
    fitted_page = page_height()
    page.execute_script("window.sam2page.showAnswer('[]', 8, 16384)")
    viewer = page.find_element(By.ID, "viewer").rect
    assert page.find_element(By.ID, "highlight-canvas").rect["height"] >= 32 * 16384 / 8 - 1
    assert viewer["y"] + viewer["height"] <= page.execute_script("return window.innerHeight") + 1
    assert page_height() <= fitted_page + 1
    touch_action = lambda: page.execute_script(  # noqa: E731
        "return getComputedStyle(document.getElementById('highlight-canvas')).touchAction")
    assert touch_action() == "pan-x pan-y"  # a finger scrolls it in the every-mask tool (it draws no boxes)
    page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
    assert touch_action() == "none"  # a finger's drag draws a box there


@pytest.mark.parametrize("width, mobile", [(400, True), (900, False)])
def test_the_image_stays_put_while_the_status_changes(page, tmp_path, width, mobile):
    """In the click tool the status line above the image goes from one line to three (on a phone,
    400 px) or two (a window 760 to 1050 px wide) and back as the image is encoded and clicks are
    answered; the image, below it, stayed put (it moved by 42 and 21 px on a phone, 20 in a window
    900 px wide, and 1 as the spinner came and went: a quick second click landed off its target)."""
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": mobile})
    try:
        with stubbed_fetch(page, stub_answers()):
            canvas_top = lambda: page.execute_script(  # noqa: E731
                "return document.getElementById('highlight-canvas').getBoundingClientRect().top")
            page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
            open_image(page, small_image(tmp_path, "phone.png"))
            wait_for(page, lambda d: page_state(d, "imageId") == "stub", timeout=10)
            tops = {status(page): canvas_top()}
            ActionChains(page).move_to_element(page.find_element(By.ID, "highlight-canvas")).click().perform()
            wait_for(page, lambda d: page_state(d, "clickAnswer") is not None, timeout=10)
            tops[status(page)] = canvas_top()
            page.find_element(By.ID, "keep-click").click()
            tops[status(page)] = canvas_top()
            assert len(tops) == 3 and len(set(tops.values())) == 1, tops
    finally:
        page.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_a_server_without_prompts_takes_back_the_click_tool_chosen_while_it_loaded(browser, server):
    """The click tool chosen while /health still says "loading", on a server that then turns out
    to run no prompts (fast_furious): the page goes back to every mask."""
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        const realFetch = window.fetch;
        window.fetch = (resource, options) => new URL(resource, location.href).pathname !== "/health"
          ? realFetch(resource, options)
          : Promise.resolve(window.modelLoaded
            ? new Response(JSON.stringify({status: "ok", queued: 0, mode: "fast_furious", device: "cpu",
                                           model: "SAM2.1 micro", weights: "demo", prompts: false}))
            : new Response('{"status":"loading"}', {status: 503}));"""})
    try:
        browser.get(server + "/")
        wait_for(browser, lambda d: "loading" in d.find_element(By.ID, "server-info").text, timeout=10)
        click = browser.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]")
        click.click()
        browser.execute_script("window.modelLoaded = true")
        wait_for(browser, lambda d: "fast_furious" in d.find_element(By.ID, "server-info").text, timeout=10)
        assert not click.is_selected() and not click.is_enabled()
        assert browser.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").is_selected()
        assert "click-tool" not in browser.find_element(By.ID, "viewer").get_attribute("class")
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", script)


def test_a_png_s_late_exif_and_compressed_xmp_turn_it_as_the_server_does(page, tmp_path):
    """Pillow reads a PNG's eXIf chunk after its image data too (browsers only before it), and
    XMP from a compressed iTXt or zTXt chunk: the page shows each as the server sees it."""
    late = tmp_path / "late.png"
    turned_image(late, 3)
    data = late.read_bytes()
    chunks, at = [], 8
    while at < len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        chunks.append(data[at:at + 12 + length])
        at += 12 + length
    exif = next(chunk for chunk in chunks if chunk[4:8] == b"eXIf")
    chunks.remove(exif)
    chunks.insert(len(chunks) - 1, exif)  # after IDAT, before IEND
    late.write_bytes(data[:8] + b"".join(chunks))
    with Image.open(late) as image:
        late_expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        assert (late_expected != np.asarray(image.convert("RGB"))).any()  # turned upside down
    compressed = tmp_path / "compressed.png"
    image = object_picture()
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", XMP_ORIENTATION.format(6), zip=True)
    image.save(compressed, pnginfo=info)
    with Image.open(compressed) as image:
        compressed_expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert compressed_expected.shape == (160, 120, 3)  # turned a quarter
    ztxt = tmp_path / "ztxt.png"  # deflated in a zTXt chunk
    info = PngImagePlugin.PngInfo()
    info.add_text("XML:com.adobe.xmp", XMP_ORIENTATION.format(8), zip=True)
    object_picture().save(ztxt, pnginfo=info)
    assert b"zTXt" in ztxt.read_bytes()
    with Image.open(ztxt) as image:
        ztxt_expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert ztxt_expected.shape == (160, 120, 3)
    with stubbed_fetch(page, {"/upload_rle": [200, [], None]}):  # the picture alone
        for path, expected in ((late, late_expected), (compressed, compressed_expected), (ztxt, ztxt_expected)):
            open_and_show(page, path)
            assert np.abs(shown_image(page).astype(int) - expected).mean() < 0.5, path.name


def exif_of(orientation: int | None, tiff_type: int = 3, count: int = 1) -> bytes:
    """EXIF (a big-endian TIFF header and one directory) whose orientation is of this TIFF type
    and count (None: no orientation): 3 (SHORT) and 1 are the usual form; 1 BYTE, 2 ASCII,
    4 LONG, 5 RATIONAL, 8 SSHORT, 13 IFD."""
    if orientation is None:
        return b"MM\0*" + struct.pack(">IHI", 8, 0, 0)
    inline = {1: bytes([orientation, 0, 0, 0]), 2: b"%d\0\0\0" % orientation,
              3: struct.pack(">HH", orientation, orientation if count > 1 else 0), 4: struct.pack(">I", orientation),
              5: struct.pack(">I", 26), 8: struct.pack(">hh", orientation, 0), 13: struct.pack(">I", orientation)}
    directory = struct.pack(">HHHI", 1, 0x0112, tiff_type, count) + inline[tiff_type] + struct.pack(">I", 0)
    return b"MM\0*" + struct.pack(">I", 8) + directory + (struct.pack(">II", 2 * orientation, 2) if tiff_type == 5 else b"")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@pytest.mark.filterwarnings("ignore:Metadata Warning")  # Pillow on the two values
def test_exif_in_forms_browsers_do_not_read_turns_the_picture_as_the_server_does(page, tmp_path):
    """Pillow reads an orientation of any number type (the first of several), after a second
    "Exif\\0\\0" header, from a PNG's last EXIF (a tEXt chunk named "exif" too) and from its text
    as ImageMagick writes it ("Raw profile type exif"); it finds none in one of text or bytes (and
    then reads no XMP), and turns nothing by EXIF it fails to read. Browsers read none of these: the
    page showed such a picture as stored, and where its size did not give it away (upside down, or
    a square) drew the masks and placed clicks turned."""
    def text(keyword: str, value: str | bytes, zipped: bool = False) -> PngImagePlugin.PngInfo:
        info = PngImagePlugin.PngInfo()
        info.add_text(keyword, value, zip=zipped)
        return info

    def raw_profile(exif: bytes, zipped: bool) -> PngImagePlugin.PngInfo:
        return text("Raw profile type exif", f"\nexif\n{len(exif):8}\n{exif.hex()}\n", zipped)

    xmp = XMP_ORIENTATION.format(6).encode()
    cases = [("long.jpg", {"exif": b"Exif\0\0" + exif_of(3, tiff_type=4), "quality": 95}, True),
             ("sshort.jpg", {"exif": b"Exif\0\0" + exif_of(6, tiff_type=8), "quality": 95}, True),
             ("rational.jpg", {"exif": b"Exif\0\0" + exif_of(8, tiff_type=5), "quality": 95}, True),
             ("ifd_type.jpg", {"exif": b"Exif\0\0" + exif_of(6, tiff_type=13), "quality": 95}, True),
             ("two_values.jpg", {"exif": b"Exif\0\0" + exif_of(6, count=2), "quality": 95}, True),
             ("two_headers.jpg", {"exif": b"Exif\0\0Exif\0\0" + exif_of(3), "quality": 95}, True),
             ("byte.jpg", {"exif": b"Exif\0\0" + exif_of(6, tiff_type=1), "quality": 95}, False),
             ("text_over_xmp.jpg", {"exif": b"Exif\0\0" + exif_of(3, tiff_type=2, count=2), "xmp": xmp,
                                    "quality": 95}, False),
             ("header_kept.png", {"exif": b"Exif\0\0Exif\0\0" + exif_of(6)}, True),  # one is dropped on saving
             ("text_named_exif.png", {"pnginfo": text("exif", exif_of(6).decode("latin-1"))}, True),
             ("compressed_text_named_exif.png", {"pnginfo": text("exif", "x", zipped=True)}, False),
             ("raw_profile_zipped.png", {"pnginfo": raw_profile(exif_of(6), True)}, True),
             ("raw_profile.png", {"pnginfo": raw_profile(exif_of(3), False)}, True),
             ("raw_profile_not_hex.png", {"pnginfo": text("Raw profile type exif", "\nexif\n       4\nzz\n")}, False),
             ("exif_before_and_after_data.png", {"exif": exif_of(None)}, True),
             # Pillow fails on a header that is not TIFF's: no turn, and no XMP read
             ("not_tiff_over_xmp.jpg", {"exif": b"Exif\0\0XX\0*" + exif_of(3)[4:], "xmp": xmp, "quality": 95}, False),
             # an entry whose value lies past the EXIF's end ends Pillow's reading: the orientation after it is
             # lost (a WebP: Chromium turns none, the page alone does)
             ("past_the_end.webp", {"exif": b"MM\0*" + struct.pack(">IHHHII", 8, 2, 0x010F, 2, 8, 200)
                                    + exif_of(6)[10:22] + bytes(4), "lossless": True}, False),
             ("empty_exif_under_xmp.jpg", {"exif": b"Exif\0\0", "xmp": xmp, "quality": 95}, True)]
    with stubbed_fetch(page, {"/upload_rle": [200, [], None]}):  # the picture alone
        for name, options, turned in cases:
            path = tmp_path / name
            object_picture().save(path, **options)
            if name == "exif_before_and_after_data.png":  # Pillow keeps the last: a quarter turn
                data = path.read_bytes()
                path.write_bytes(data[:-12] + png_chunk(b"eXIf", exif_of(6)) + data[-12:])
            expected = decode_image(path.read_bytes(), 10**6)  # as the server sees it
            with Image.open(path) as image:
                stored = np.asarray(image.convert("RGB"))
            assert turned == (expected.shape != stored.shape or np.abs(expected.astype(int) - stored).mean() > 10), name
            open_and_show(page, path)
            shown = shown_image(page)
            assert shown.shape == expected.shape, name
            assert np.abs(shown.astype(int) - expected).mean() < (3 if name.endswith("jpg") else 0.5), name


def test_an_empty_click_mask_cannot_be_added(page, tmp_path):
    answers = stub_answers()
    answers["/segment"][1]["results"][0]["masks"] = [rle(np.zeros(SMALL[::-1], dtype=bool))]
    with stubbed_fetch(page, answers):
        in_the_click_tool(page, small_image(tmp_path, "empty.png"))
        pointer(page, "pointerdown", 5, 40)
        pointer(page, "pointerup", 5, 40)
        wait_for(page, lambda d: status(d).startswith("Mask in "), timeout=10)
        assert not page.find_element(By.ID, "keep-click").is_enabled()


def test_a_click_on_an_image_the_server_dropped_encodes_it_again(page, tmp_path):
    """/segment answers 404 for an image id the server no longer holds: the page asks /embed for
    a new id and sends the click again with it."""
    with stubbed_fetch(page, stub_answers()):
        in_the_click_tool(page, small_image(tmp_path, "dropped.png"))
        # Over the stub: /embed gives new ids, /segment refuses the first one (404) as a server would.
        page.execute_script("""
            const inner = window.fetch;
            window.segmentIds = [];
            let embeds = 0;
            window.fetch = async (resource, options) => {
              const path = new URL(resource, location.href).pathname;
              if (path === "/embed") {
                embeds += 1;
                return new Response(JSON.stringify({image_id: `new${embeds}`, size: [48, 64]}), {status: 200});
              }
              if (path === "/segment") {
                const id = JSON.parse(options.body).image_id;
                window.segmentIds.push(id);
                if (!id.startsWith("new")) return new Response('{"error": "unknown image_id"}', {status: 404});
              }
              return inner(resource, options);
            };""")
        pointer(page, "pointerdown", 30, 20)
        pointer(page, "pointerup", 30, 20)
        wait_for(page, lambda d: status(d).startswith("Mask in ") or d.find_element(By.ID, "error").is_displayed(),
                 timeout=10)
        assert not page.find_element(By.ID, "error").is_displayed(), page.find_element(By.ID, "error").text
        assert page.execute_script("return window.segmentIds") == ["stub", "new1"]
        assert page_state(page, "imageId") == "new1" and page_state(page, "clickAnswer") is not None


# Script lines that make `transfer`, a DataTransfer of a text file and a PNG, as a drop or a paste carries.
A_TEXT_FILE_AND_A_PNG = """
    const canvas = document.createElement("canvas"); canvas.width = 64; canvas.height = 48;
    canvas.getContext("2d").fillRect(0, 0, 64, 64);
    const png = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    const transfer = new DataTransfer();
    transfer.items.add(new File(["notes"], "notes.txt", {type: "text/plain"}));
    transfer.items.add(new File([png], arguments[0], {type: "image/png"}));
"""


def test_a_dropped_or_pasted_image_opens_not_the_text_file_beside_it(page):
    with stubbed_fetch(page, stub_answers()):
        page.execute_async_script("const done = arguments[arguments.length - 1]; (async () => {" +
                                  A_TEXT_FILE_AND_A_PNG.replace("arguments[0]", "'dropped.png'") +
                                  "document.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true,"
                                  " cancelable: true})); })().then(() => done());")
        wait_for(page, lambda d: status(d).startswith("1 mask in "), timeout=10)
        assert page_state(page, "name") == "dropped" and not page.find_element(By.ID, "error").is_displayed()
        page.execute_async_script("const done = arguments[arguments.length - 1]; (async () => {" +
                                  A_TEXT_FILE_AND_A_PNG.replace("arguments[0]", "'pasted.png'") +
                                  "document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: transfer,"
                                  " bubbles: true, cancelable: true})); })().then(() => done());")
        wait_for(page, lambda d: page_state(d, "name") == "pasted", timeout=10)
        wait_for(page, lambda d: status(d).startswith("1 mask in "), timeout=10)


def test_masks_of_another_width_are_not_drawn(page, tmp_path):
    """The server's masks must be the image's size as shown: masks one pixel wider are refused."""
    mask = np.zeros((SMALL[1], SMALL[0] + 1), dtype=bool)
    mask[10:30, 20:40] = True
    with stubbed_fetch(page, {"/upload_rle": [200, [coco_record(mask)], 0]}):
        open_image(page, small_image(tmp_path, "wider.png"))
        wait_for(page, lambda d: d.find_element(By.ID, "error").is_displayed(), timeout=10)
        assert "The server's masks are 65x48 but the browser shows the image as 64x48" in \
            page.find_element(By.ID, "error").text
        assert page_state(page, "labels") is None


def error_text(driver) -> str:
    return driver.find_element(By.ID, "error").text


def test_a_503_that_says_when_to_try_again_is_not_told_twice(page, tmp_path):
    page.execute_script(
        "window.realFetch = window.realFetch || window.fetch;"
        "window.fetch = async () => new Response(JSON.stringify({error: 'the queue is full; try again shortly'}),"
        "  {status: 503, headers: {'Retry-After': '7'}});")
    try:
        open_image(page, small_image(tmp_path, "busy.png"))
        wait_for(page, lambda d: d.find_element(By.ID, "error").is_displayed(), timeout=10)
        assert error_text(page) == "The queue is full; try again shortly."
    finally:
        page.execute_script("window.fetch = window.realFetch;")


def test_a_timeout_or_an_unreachable_server_is_not_the_image_s_fault(page, tmp_path):
    """A 504, or no answer at all (the server gone): the image may be opened again, not "open another"."""
    with stubbed_fetch(page, {"/upload_rle": [504, {"error": "no answer within 60 s"}, 0]}):
        open_image(page, small_image(tmp_path, "slow.png"))
        wait_for(page, lambda d: d.find_element(By.ID, "error").is_displayed(), timeout=10)
        assert error_text(page) == "The server took too long: no answer within 60 s"
        assert status(page).startswith("No masks yet: open the image again")
    page.execute_script(
        "window.realFetch = window.realFetch || window.fetch;"
        "window.fetch = async () => { throw new TypeError('Failed to fetch'); };")
    try:
        open_image(page, small_image(tmp_path, "gone.png"))
        wait_for(page, lambda d: "Cannot reach the server" in error_text(d), timeout=10)
        assert status(page).startswith("No masks yet: open the image again")
    finally:
        page.execute_script("window.fetch = window.realFetch;")


def test_a_refusal_of_the_page_s_filters_says_so(page, tmp_path):
    page.find_element(By.CSS_SELECTOR, "#filters summary").click()
    set_filters(page, {"box_nms_thresh": "0.5"})
    try:
        with stubbed_fetch(page, {"/upload_rle": [400, {"error": "box_nms_thresh: not with this model"}, 0]}):
            open_image(page, small_image(tmp_path, "filters.png"))
            wait_for(page, lambda d: d.find_element(By.ID, "error").is_displayed(), timeout=10)
            assert error_text(page) == "The server refused the request: box_nms_thresh: not with this model"
            assert status(page) == "No masks: the server refused this page's filters; correct them, then Segment again."
    finally:
        set_filters(page, {"box_nms_thresh": "0.7"})


def log_queries(driver) -> None:
    driver.execute_script("""
        window.queries = [];
        const inner = window.fetch;
        window.fetch = (resource, options) => {
          const url = new URL(resource, location.href);
          if (url.pathname === "/upload_rle") window.queries.push(url.search);
          return inner(resource, options);
        };""")


def test_an_emptied_filter_field_asks_for_the_server_s_value(page, tmp_path):
    with stubbed_fetch(page, stub_answers()):
        log_queries(page)
        open_image(page, small_image(tmp_path, "filters.png"))
        wait_for(page, lambda d: status(d).startswith("1 mask in "), timeout=10)
        page.find_element(By.CSS_SELECTOR, "#filters summary").click()
        page.find_element(By.ID, "pred_iou_thresh").clear()
        set_filters(page, {"box_nms_thresh": "0.5"})
        page.find_element(By.ID, "segment-again").click()
        wait_for(page, lambda d: len(d.execute_script("return window.queries")) == 2, timeout=10)
        assert page.execute_script("return window.queries")[1] == "?format=coco&box_nms_thresh=0.5"
    set_filters(page, {"box_nms_thresh": "0.7"})


def test_segment_again_asks_before_it_drops_the_clicks(page, tmp_path):
    with stubbed_fetch(page, stub_answers()):
        a_click_answered(page, small_image(tmp_path, "clicks.png"))
        page.find_element(By.CSS_SELECTOR, "#filters summary").click()
        page.find_element(By.ID, "segment-again").click()
        wait_for(page, lambda d: "and the clicks, are lost" in d.switch_to.alert.text, timeout=10)
        page.switch_to.alert.dismiss()
        assert len(page_state(page, "clicks")) == 1


def test_segment_again_while_a_chosen_file_is_decoded_segments_that_file(page, tmp_path):
    """Segment again pressed while the browser still decoded a file just chosen (a large photo
    takes a while) opened the image before once more, and dropped the chosen one without a word."""
    with stubbed_fetch(page, stub_answers()):
        open_image(page, small_image(tmp_path, "before.png"))
        wait_for(page, lambda d: status(d).startswith("1 mask in "), timeout=10)
        page.execute_script("""
            window.realCreateImageBitmap = window.createImageBitmap;
            window.createImageBitmap = async (...args) => {
              if (args[0] instanceof File) await new Promise((resolve) => setTimeout(resolve, 1500));
              return window.realCreateImageBitmap(...args);
            };""")
        try:
            open_image(page, small_image(tmp_path, "chosen.png"))
            page.find_element(By.CSS_SELECTOR, "#filters summary").click()
            page.find_element(By.ID, "segment-again").click()
            wait_for(page, lambda d: page_state(d, "name") == "chosen" and status(d).startswith("1 mask in "), timeout=10)
            time.sleep(2)  # every decode has ended
            assert page_state(page, "name") == "chosen"
        finally:
            page.execute_script("window.createImageBitmap = window.realCreateImageBitmap;")


def test_the_list_sorts_by_predicted_iou(page):
    width, height = 40, 30
    ys, xs = np.mgrid[:height, :width]
    masks = [xs < 20, (xs >= 25) & (ys < 10), (xs >= 25) & (ys >= 15) & (ys < 20)]  # areas 600, 150, 75
    records = [{**coco_record(mask), "predicted_iou": iou} for mask, iou in zip(masks, [0.85, 0.8, 0.95])]
    page.execute_script("window.sam2page.showAnswer(arguments[0], arguments[1], arguments[2])",
                        json.dumps(records), width, height)
    assert list_order(page) == ["0", "1", "2"]
    sort_by = Select(page.find_element(By.ID, "sort-by"))
    sort_by.select_by_value("score")
    assert list_order(page) == ["2", "0", "1"]
    sort_by.select_by_value("area")
    assert list_order(page) == ["0", "1", "2"]


TWO_MASKS_WIDTH, TWO_MASKS_HEIGHT = 80, 60


def two_masks(page):
    ys, xs = np.mgrid[:TWO_MASKS_HEIGHT, :TWO_MASKS_WIDTH]
    masks = [xs < 40, (xs >= 50) & (ys >= 20) & (ys < 40)]
    page.execute_script("window.sam2page.showAnswer(arguments[0], arguments[1], arguments[2])",
                        json.dumps([coco_record(mask) for mask in masks]), TWO_MASKS_WIDTH, TWO_MASKS_HEIGHT)


def test_a_mask_hovered_last_goes_when_the_pointer_leaves_the_image(page):
    two_masks(page)
    canvas = page.find_element(By.ID, "highlight-canvas")
    ActionChains(page).move_to_element_with_offset(canvas, *screen_offset(page, 60, 30)).perform()
    assert page_state(page, "hovered") == 1 and highlight_alpha(page) > 0
    ActionChains(page).move_to_element(page.find_element(By.TAG_NAME, "h1")).perform()
    assert page_state(page, "hovered") == -1 and highlight_alpha(page) == 0
    assert page.find_element(By.ID, "hover-info").text.strip() == ""


def test_the_selected_mask_s_figures_come_back_when_nothing_is_hovered(page):
    two_masks(page)
    page.find_element(By.CSS_SELECTOR, "#mask-list tr[data-index='0']").click()
    page.execute_script("setHovered(1)")
    assert page.find_element(By.ID, "hover-info").text.startswith("mask 1:")
    page.execute_script("setHovered(-1)")
    assert page.find_element(By.ID, "hover-info").text.startswith("mask 0:")


def test_every_mask_layer_is_filled_lighter_for_large_masks_and_edged_where_labels_meet(page):
    """The every-mask layer, pixel by pixel: a mask over half the image (the background) at alpha 60,
    others at 150, and opaque wherever one of the 4 neighbours inside the image has another label
    (another mask, or none), on every side of a mask."""
    width, height = 40, 30
    ys, xs = np.mgrid[:height, :width]
    background = (xs < 36) & (ys < 26)  # 936 of 1200 pixels: over half
    square = (xs >= 10) & (xs < 20) & (ys >= 8) & (ys < 16)
    page.execute_script("window.sam2page.showAnswer(arguments[0], arguments[1], arguments[2])",
                        json.dumps([coco_record(background), coco_record(square)]), width, height)
    alpha = np.array(page.execute_script(
        "const c = document.getElementById('mask-canvas');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data.filter((_, i) => i % 4 === 3))"),
        dtype=np.int32).reshape(height, width)
    labels = np.zeros((height, width), dtype=np.int64)
    labels[background] = 1
    labels[square] = 2  # the smaller on top
    padded = np.pad(labels, 1, constant_values=-1)  # -1: outside the image, no border there
    centre = padded[1:-1, 1:-1]
    border = np.zeros_like(labels, dtype=bool)
    for neighbour in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        border |= (neighbour != -1) & (neighbour != centre)
    expected = np.where(labels == 0, 0, np.where(border, 255, np.where(labels == 1, 60, 150)))
    assert np.array_equal(alpha, expected)


def test_a_mouse_held_still_is_a_point_on_the_object(page, tmp_path):
    """The long press is touch's right click: a mouse button held as long is an ordinary click."""
    with stubbed_fetch(page, stub_answers()):
        in_the_click_tool(page, small_image(tmp_path, "held.png"))
        pointer(page, "pointerdown", 30, 20)
        time.sleep(0.7)
        pointer(page, "pointerup", 30, 20)
        wait_for(page, lambda d: len(page_state(d, "clicks")) == 1, timeout=10)
        assert page_state(page, "clicks")[0]["label"] == 1


def test_undo_takes_back_the_clicks_after_a_box_first_and_ctrl_shift_z_is_no_undo(page, tmp_path):
    with stubbed_fetch(page, stub_answers()):
        in_the_click_tool(page, small_image(tmp_path, "undo.png"))
        pointer(page, "pointerdown", 10, 10)  # a box first
        pointer(page, "pointermove", 40, 30)
        pointer(page, "pointerup", 40, 30)
        wait_for(page, lambda d: page_state(d, "box") is not None, timeout=10)
        box = page_state(page, "box")
        pointer(page, "pointerdown", 30, 20)  # then a click
        pointer(page, "pointerup", 30, 20)
        wait_for(page, lambda d: len(page_state(d, "clicks")) == 1, timeout=10)
        page.execute_script("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Z', code: 'KeyZ', "
                            "ctrlKey: true, shiftKey: true, bubbles: true, cancelable: true}))")  # redo, elsewhere
        assert len(page_state(page, "clicks")) == 1 and page_state(page, "box") == box
        ctrl_key(page, "z", "KeyZ")
        wait_for(page, lambda d: page_state(d, "clicks") == [], timeout=10)
        assert page_state(page, "box") == box  # the click, made after the box, went first
        ctrl_key(page, "z", "KeyZ")
        wait_for(page, lambda d: page_state(d, "box") is None, timeout=10)


def test_undo_keys_do_nothing_in_the_every_mask_tool(page, tmp_path):
    """The clicks stay (unseen) while the every-mask tool is in use: Backspace there takes none back."""
    with stubbed_fetch(page, stub_answers()):
        a_click_answered(page, small_image(tmp_path, "tools.png"))
        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").click()
        page.execute_script("document.dispatchEvent(new KeyboardEvent('keydown', "
                            "{key: 'Backspace', code: 'Backspace', bubbles: true, cancelable: true}))")
        ctrl_key(page, "z", "KeyZ")
        time.sleep(0.3)
        assert len(page_state(page, "clicks")) == 1


def test_clear_clicks_clears_the_box_too(page, tmp_path):
    with stubbed_fetch(page, stub_answers()):
        in_the_click_tool(page, small_image(tmp_path, "clear.png"))
        pointer(page, "pointerdown", 10, 10)
        pointer(page, "pointermove", 40, 30)
        pointer(page, "pointerup", 40, 30)
        wait_for(page, lambda d: page_state(d, "clickAnswer") is not None, timeout=10)
        page.find_element(By.ID, "clear-clicks").click()
        wait_for(page, lambda d: page_state(d, "clickAnswer") is None, timeout=10)
        assert page_state(page, "box") is None
        assert not page.find_element(By.ID, "clear-clicks").is_enabled()


def test_a_click_on_the_image_s_far_edge_is_on_its_last_pixel(page, tmp_path):
    """The pointer on the right and bottom edges: the point is on the last column and row (a
    mask under it is found there), not one past them."""
    with stubbed_fetch(page, stub_answers()):
        in_the_click_tool(page, small_image(tmp_path, "edge.png"))
        pointer(page, "pointerdown", SMALL[0] - 0.5, SMALL[1] - 0.5)  # the canvas's bottom right corner
        pointer(page, "pointerup", SMALL[0] - 0.5, SMALL[1] - 0.5)
        wait_for(page, lambda d: len(page_state(d, "clicks")) == 1, timeout=10)
        click = page_state(page, "clicks")[0]
        assert (click["x"], click["y"]) == (SMALL[0] - 1, SMALL[1] - 1)


def test_a_second_finger_moving_draws_no_box(page, tmp_path):
    """While one finger is down, another finger's move is not the first one's drag: no box drawn."""
    with stubbed_fetch(page, stub_answers()):
        in_the_click_tool(page, small_image(tmp_path, "fingers.png"))
        pointer(page, "pointerdown", 10, 10, 7, "touch")
        pointer(page, "pointermove", 50, 40, 8, "touch", primary=False)
        assert page_state(page, "dragBox") is None
        pointer(page, "pointerup", 10, 10, 7, "touch")
        wait_for(page, lambda d: len(page_state(d, "clicks")) == 1, timeout=10)
        assert page_state(page, "box") is None


def cursor_said(driver) -> str:
    """What a screen reader hears of the keyboard's cursor (its live region)."""
    return driver.find_element(By.ID, "cursor-info").get_attribute("textContent")


def cursor_drawn(driver) -> bool:
    """Whether the keyboard's crosshair is drawn on a SMALL image: its four arms white, 8 pixels
    from the cursor (a point's circle, 5 pixels at most, leaves them be)."""
    return driver.execute_script("""
        const c = window.sam2page.state.cursor;
        const context = document.getElementById("highlight-canvas").getContext("2d");
        return Boolean(c) && [[8, 0], [-8, 0], [0, 8], [0, -8]].every(([dx, dy]) =>
          context.getImageData(c.x + dx, c.y + dy, 1, 1).data.every((v) => v === 255));""")


def segment_prompts(driver) -> list[dict]:
    """The prompt of each /segment request sent (stubbed_fetch logs their bodies)."""
    return [body["prompts"][0] for path, body in driver.execute_script("return window.fetchBodies")
            if path == "/segment"]


def keys(driver, *keys, shift: bool = False) -> None:
    """Keys pressed where the keyboard is, as a person would (Shift held: shift=True)."""
    actions = ActionChains(driver).key_down(Keys.SHIFT) if shift else ActionChains(driver)
    actions = actions.send_keys(*keys)
    (actions.key_up(Keys.SHIFT) if shift else actions).perform()


def tab_to_the_image(driver) -> None:
    driver.execute_script("document.getElementById('open-masks').focus()")  # the last control before it
    keys(driver, Keys.TAB)
    assert focused(driver) == "highlight-canvas"


def test_the_keyboard_moves_a_cursor_on_the_image_and_adds_points_at_it(page, tmp_path):
    """The click tool added no point from the keyboard. The image is a Tab stop in it, where a
    crosshair shows that the arrow keys move (a step: 1% of the longer side, at least a pixel;
    Shift: ten), held within the image; Enter or Space adds a point on the object at it,
    Shift+Enter one off it, each asked for as a click's; Backspace takes the last back. A screen
    reader hears the cursor's place in image pixels, and each point added."""
    with stubbed_fetch(page, stub_answers()):
        in_the_click_tool(page, small_image(tmp_path, "keys.png"))
        assert highlight_alpha(page) == 0  # no clicks, no cursor
        # The cursor's live region, hidden, does not make the viewer scroll (a Tab stop of its own).
        assert page.execute_script("const v = document.getElementById('viewer');"
                                   "return v.scrollHeight === v.clientHeight")
        tab_to_the_image(page)
        assert page.find_element(By.ID, "highlight-canvas").get_attribute("role") == "application"
        assert cursor_drawn(page) and cursor_said(page) == "32, 24"  # the image's centre (64 x 48)
        for pressed, shift, said in [((Keys.ARROW_RIGHT,), False, "33, 24"), ((Keys.ARROW_DOWN,), True, "33, 34"),
                                     ((Keys.ARROW_LEFT,) * 3, False, "30, 34"), ((Keys.ARROW_UP,), False, "30, 33")]:
            keys(page, *pressed, shift=shift)
            assert cursor_said(page) == said
        assert cursor_drawn(page)
        scrolled = page.execute_script("return [window.scrollY, document.getElementById('viewer').scrollTop]")
        keys(page, Keys.ENTER)
        wait_for(page, lambda d: segment_prompts(d)[-1:] == [{"points": [[30, 33]], "labels": [1]}], timeout=10)
        assert cursor_said(page) == "Point 1 on the object at 30, 33."
        keys(page, Keys.ARROW_RIGHT, shift=True)
        keys(page, Keys.ENTER, shift=True)
        wait_for(page, lambda d: segment_prompts(d)[-1] == {"points": [[30, 33], [40, 33]], "labels": [1, 0]},
                 timeout=10)
        assert cursor_said(page) == "Point 2 off the object at 40, 33."
        keys(page, Keys.ARROW_DOWN, Keys.SPACE)
        wait_for(page, lambda d: segment_prompts(d)[-1]["labels"] == [1, 0, 1], timeout=10)
        assert segment_prompts(page)[-1]["points"][-1] == [40, 34]
        assert page.execute_script("return [window.scrollY, document.getElementById('viewer').scrollTop]") == scrolled
        keys(page, Keys.BACKSPACE)
        wait_for(page, lambda d: segment_prompts(d)[-1] == {"points": [[30, 33], [40, 33]], "labels": [1, 0]},
                 timeout=10)
        keys(page, *(Keys.ARROW_RIGHT,) * 3, shift=True)  # 70: held on the last column
        keys(page, *(Keys.ARROW_UP,) * 5, shift=True)
        assert cursor_said(page) == "63, 0"
        keys(page, Keys.TAB)  # the keyboard leaves the image: the cursor goes
        assert focused(page) != "highlight-canvas" and not page_state(page, "cursorShown")
        assert len(page_state(page, "clicks")) == 2


def test_the_keyboard_s_cursor_is_for_the_keyboard_alone_and_the_pointer_clicks_as_before(page, tmp_path):
    """A mouse's click adds its point where it is and shows no cursor; after a press the cursor
    goes, and the next Enter shows it again rather than add a point where none is shown. The
    image is no Tab stop in the every-mask tool."""
    with stubbed_fetch(page, stub_answers()):
        canvas, _, _ = in_the_click_tool(page, small_image(tmp_path, "both.png"))
        pointer(page, "pointerdown", 10, 40)
        pointer(page, "pointerup", 10, 40)
        wait_for(page, lambda d: segment_prompts(d)[-1:] == [{"points": [[10.5, 40.5]], "labels": [1]}], timeout=10)
        ActionChains(page).move_to_element_with_offset(canvas, -20, -20).click().perform()  # a real mouse's click
        wait_for(page, lambda d: len(page_state(d, "clicks")) == 2, timeout=10)
        assert page_state(page, "clicks")[1]["label"] == 1 and not cursor_drawn(page)
        tab_to_the_image(page)
        assert cursor_drawn(page)
        ActionChains(page).move_to_element_with_offset(canvas, 20, 20).key_down(Keys.SHIFT).click() \
            .key_up(Keys.SHIFT).perform()  # shift-click, the keyboard on the image
        wait_for(page, lambda d: [c["label"] for c in page_state(d, "clicks")] == [1, 1, 0], timeout=10)
        last = page_state(page, "clicks")[2]
        assert (last["x"], last["y"]) != (32, 24) and not cursor_drawn(page)  # the pointer's place, not the cursor's
        keys(page, Keys.ENTER)  # shows the cursor
        assert cursor_drawn(page) and len(page_state(page, "clicks")) == 3
        keys(page, Keys.ENTER)  # adds at it
        wait_for(page, lambda d: len(page_state(d, "clicks")) == 4, timeout=10)
        assert page_state(page, "clicks")[3] == {"x": 32, "y": 24, "label": 1}
        page.find_element(By.CSS_SELECTOR, "input[name=tool][value=everything]").click()
        assert canvas.get_attribute("tabindex") is None and canvas.get_attribute("role") is None


def test_the_keyboard_s_cursor_scrolls_a_strip_to_keep_in_sight(page, tmp_path):
    """A strip wider than the viewer: the cursor, at its centre, then moved on, stays in the part shown."""
    with stubbed_fetch(page, stub_answers(size=(4000, 40))):
        in_the_click_tool(page, small_image(tmp_path, "strip.png", size=(4000, 40)))
        shown = """const viewer = document.getElementById("viewer");
            const canvas = document.getElementById("highlight-canvas");
            const left = ((window.sam2page.state.cursor.x + 0.5) * canvas.clientWidth) / 4000;
            return viewer.scrollWidth > viewer.clientWidth
              && viewer.scrollLeft <= left && left <= viewer.scrollLeft + viewer.clientWidth;"""
        tab_to_the_image(page)
        assert cursor_said(page) == "2000, 20" and page.execute_script(shown)
        keys(page, *(Keys.ARROW_RIGHT,) * 4, shift=True)  # 400 pixels a press
        assert cursor_said(page) == "3600, 20" and page.execute_script(shown)


def test_the_keyboard_stays_on_the_image_while_another_opens_and_hears_a_point_taken_back(page, tmp_path):
    """An image pasted while the keyboard was on the image: the image stopped being a Tab stop
    until its masks came, and the keyboard went to <body>, the old image's place still said.
    Backspace took a point back without a word for a screen reader."""
    with stubbed_fetch(page, stub_answers()):
        in_the_click_tool(page, small_image(tmp_path, "first.png"))
        tab_to_the_image(page)
        keys(page, Keys.ENTER)
        wait_for(page, lambda d: segment_prompts(d)[-1:] == [{"points": [[32, 24]], "labels": [1]}], timeout=10)
        keys(page, Keys.BACKSPACE)
        assert cursor_said(page) == "Taken back: 0 points left."
        page.execute_script(PASTE)
        wait_for(page, lambda d: d.execute_script("const s = window.sam2page.state;"
                                                  "return s.name === 'pasted' && s.labels !== null"), timeout=10)
        assert focused(page) == "highlight-canvas" and cursor_said(page) == ""
        assert not page_state(page, "cursorShown")
        keys(page, Keys.ARROW_LEFT)
        assert cursor_said(page) == "31, 24" and cursor_drawn(page)


def test_the_image_is_no_tab_stop_where_the_click_tool_is_off_for_it(page, tmp_path):
    """An image the server refused has no masks, and the click tool is off for it: its keys did
    nothing, yet the image was a Tab stop (and one before its masks came)."""
    canvas = page.find_element(By.ID, "highlight-canvas")
    page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").click()
    with stubbed_fetch(page, {"/upload_rle": [400, {"error": "as the server says"}, 0]}):
        open_image(page, small_image(tmp_path, "refused.png"))
        wait_for(page, lambda d: d.find_element(By.ID, "error").is_displayed(), timeout=10)
        assert canvas.get_attribute("tabindex") is None and canvas.get_attribute("role") is None
    with stubbed_fetch(page, stub_answers()):
        open_image(page, small_image(tmp_path, "answered.png"))
        wait_for(page, lambda d: page_state(d, "imageId") == "stub", timeout=10)
        assert canvas.get_attribute("tabindex") == "0" and canvas.get_attribute("role") == "application"


def test_a_server_restarted_with_other_settings_is_the_one_the_page_describes_and_asks(page, server, tmp_path):
    """The page read /health once: after a restart with --pred-iou-thresh 0.5 it still showed 0.8
    and sent nothing (0.8 was the old server's), and after one in half precision it still said
    mode ao and offered clicks. /health is read again before each image (a restart stands in)."""
    with urllib.request.urlopen(server + "/health", timeout=30) as answer:
        info = json.load(answer)
    restarted = {**info, "mode": "fast_furious", "prompts": False, "amg": {**info["amg"], "pred_iou_thresh": 0.5}}
    field = page.find_element(By.ID, "pred_iou_thresh")
    assert field.get_attribute("value") == "0.8"
    page.execute_script("document.getElementById('stability_score_thresh').value = ''")  # the server's, whichever
    with stubbed_fetch(page, {**stub_answers(), "/health": [200, restarted, 0]}):
        open_image(page, small_image(tmp_path, "after_restart.png"))
        wait_for(page, lambda d: status(d).startswith("1 mask in "), timeout=10)
        assert field.get_attribute("value") == "0.5" and "this page's filters" not in status(page)
        assert page.find_element(By.ID, "stability_score_thresh").get_attribute("value") == ""
        assert "mode fast_furious" in page.find_element(By.ID, "server-info").text
        assert not page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").is_enabled()
        assert "not in mode fast_furious" in page.find_element(By.ID, "tool").text
    open_image(page, small_image(tmp_path, "after_another.png"))  # the real server again
    wait_for(page, lambda d: " in " in status(d) and "after_another" not in status(d), timeout=60)
    assert field.get_attribute("value") == "0.8" and "mode ao" in page.find_element(By.ID, "server-info").text
    assert page.find_element(By.CSS_SELECTOR, "input[name=tool][value=click]").is_enabled()
    assert "not in mode" not in page.find_element(By.ID, "tool").text


def test_a_drop_without_a_file_says_so(page):
    """An image dragged from another web page drops as its link, no file: nothing happened. (Text
    dropped on a field of the Filters box is no such mistake.)"""
    drop = """const data = new DataTransfer();
        data.setData('text/uri-list', 'https://example.com/cat.jpg');
        document.getElementById(arguments[0]).dispatchEvent(
          new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));"""
    error = page.find_element(By.ID, "error")
    page.execute_script(drop, "pred_iou_thresh")
    assert not error.is_displayed()
    page.execute_script(drop, "viewer")
    assert error.is_displayed() and "holds no file" in error.text

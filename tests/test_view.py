"""``opendino view``: the feature viewer's answers against direct computations with the model, its refusals
(bad uploads, path traversal) with the server staying up, the text view, the command line, and the page
driven in a real headless Chromium through Selenium (skipped, with the reason, where Chromium is absent)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from opendino.data.sources import decode_image
from opendino.eval.features import eval_transform
from opendino.models import build_model, save_model
from opendino.models.text import TextAlignedModel, TextTransformer, VisionHead
from opendino.view.server import FeatureViewer, ViewerLimits, running

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
RESOLUTION = 64


def _backbone(depth: int = 3):
    torch.manual_seed(0)
    return build_model("vits16", embed_dim=48, num_heads=2, depth=depth).eval()


def _images(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        pixels = np.full((80, 96, 3), rng.integers(0, 255, 3), dtype=np.uint8)
        pixels[20:60, 10 + 10 * i : 50 + 10 * i] = rng.integers(0, 255, 3)  # an object on a plain ground
        paths.append(folder / f"scene{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _call(url: str, body=None, raw: bool = False) -> tuple[int, dict | bytes]:
    data = None if body is None else (body if raw else json.dumps(body).encode())
    kind = "application/octet-stream" if raw else "application/json"
    request = urllib.request.Request(url, data=data, headers={"Content-Type": kind})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            status, payload = answer.status, answer.read()
    except urllib.error.HTTPError as e:
        status, payload = e.code, e.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload


def _direct_similarity(model, path: Path, layer: int, row: int, col: int, resolution: int = RESOLUTION) -> torch.Tensor:
    """What the viewer should answer, computed here from the model alone."""
    image = eval_transform(resolution, MEAN, STD)(decode_image(path))[None]
    with torch.no_grad():
        (grid,) = model.get_intermediate_layers(image, n=[layer], reshape=True)
    rows = F.normalize(grid[0].flatten(1).T, dim=-1)
    h, w = grid.shape[-2:]
    return rows @ rows[row * w + col], (h, w), rows


def test_similarity_answers_equal_a_direct_computation_and_are_cached(tmp_path):
    model = _backbone()
    paths = _images(tmp_path / "images")
    viewer = FeatureViewer(model, MEAN, STD, name="tiny", resolution=RESOLUTION, images=tmp_path / "images")
    with running(viewer) as url:
        status, info = _call(url + "/api/info")
        assert status == 200 and info["images"] == ["scene0.png", "scene1.png", "scene2.png"]
        assert info["layers"][-1] == "block 3 (last)" and info["layer"] == 2 and len(info["colormap"]) == 256
        status, up = _call(url + "/api/upload", paths[0].read_bytes(), raw=True)
        assert status == 200 and up["image"].startswith("upload:")
        for layer in (0, 2):
            status, answer = _call(
                url + "/api/similarity",
                {"image": up["image"], "row": 1, "col": 2, "other": "scene1.png", "layer": layer},
            )
            assert status == 200, answer
            expected, (h, w), _ = _direct_similarity(model, paths[0], layer, 1, 2)
            assert (answer["h"], answer["w"]) == (h, w) == (4, 4)
            torch.testing.assert_close(torch.tensor(answer["values"]), expected, atol=1e-5, rtol=0)
            query = _direct_similarity(model, paths[0], layer, 1, 2)[2][1 * w + 2]
            towards = _direct_similarity(model, paths[1], layer, 0, 0)[2] @ query
            torch.testing.assert_close(torch.tensor(answer["other"]["values"]), towards, atol=1e-5, rtol=0)
            assert answer["other"]["best"] == [int(towards.argmax()) // w, int(towards.argmax()) % w]
        status, answer = _call(url + "/api/similarity", {"image": "scene2.png", "row": 0, "col": 0, "resolution": 96})
        assert status == 200 and (answer["h"], answer["w"]) == (6, 6)
        assert abs(answer["values"][0] - 1) < 1e-5  # a patch is its own best match
    # every (image, layer, resolution) was computed once: the calls above hit the cache after the first
    assert len(viewer._features) == 5


def test_bad_uploads_and_path_traversal_are_refused_and_the_server_keeps_serving(tmp_path, caplog):
    model = _backbone(depth=1)
    paths = _images(tmp_path / "images", 1)
    secret = tmp_path / "secret.png"
    shutil.copy(paths[0], secret)  # outside --images: must never be served
    limits = ViewerLimits(max_upload_bytes=40_000, max_pixels=80 * 96)
    viewer = FeatureViewer(
        model, MEAN, STD, name="tiny", resolution=RESOLUTION, images=tmp_path / "images", limits=limits
    )
    caplog.set_level(logging.WARNING, logger="opendino.view")
    with running(viewer) as url:
        for name in (
            "../secret.png",
            "..%2Fsecret.png",
            "%2E%2E/secret.png",
            str(secret),
            "scene0.png/../../secret.png",
        ):
            status, answer = _call(f"{url}/api/images/{name}")
            assert status == 404 and "no image named" in answer["error"], name
        status, body = _call(url + "/api/images/scene0.png")
        assert status == 200 and body == paths[0].read_bytes()
        noise = np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / "big.png")  # ~43 kB: above the byte limit
        Image.fromarray(np.zeros((90, 90, 3), np.uint8)).save(tmp_path / "many.png")  # 8,100 pixels: above
        refusals = [
            (b"", 400, "the upload is empty"),
            (b"this is not an image", 400, "not an image this viewer can read"),
            (paths[0].read_bytes()[:200], 400, "not an image this viewer can read"),  # a cut-off file
            ((tmp_path / "big.png").read_bytes(), 413, "the limit is 0.0381 MB"),
            ((tmp_path / "many.png").read_bytes(), 413, "90 x 90 pixels (0.0081 megapixels); the limit is 0.00768"),
        ]
        for body, code, words in refusals:
            status, answer = _call(url + "/api/upload", body, raw=True)
            assert status == code and words in answer["error"], (status, answer)
        for request, words in [
            ({"image": "scene0.png", "row": 9, "col": 0}, "outside the 4 x 4 patch grid"),
            ({"image": "scene0.png", "row": 0, "col": 0, "layer": 5}, "layer 5: give 0 to 0"),
            ({"image": "scene0.png", "row": 0, "col": 0, "resolution": 70}, "multiple of the model's stride 16"),
            ({"image": "upload:0123", "row": 0, "col": 0}, "no longer cached"),
            ({"row": 0, "col": 0}, "image: Field required"),
        ]:
            status, answer = _call(url + "/api/similarity", request)
            assert status in (400, 404) and words in answer["error"], (request, answer)
        status, answer = _call(url + "/api/text", {"image": "scene0.png", "text": "a cat"})
        assert status == 400 and "no text tower" in answer["error"]
        # still serving: a good upload and a click work after all of that
        status, up = _call(url + "/api/upload", paths[0].read_bytes(), raw=True)
        assert status == 200
        status, answer = _call(url + "/api/similarity", {"image": up["image"], "row": 0, "col": 0})
        assert status == 200 and len(answer["values"]) == 16
    logged = [r.getMessage() for r in caplog.records if r.name == "opendino.view"]
    assert sum("refused" in line for line in logged) >= 16 and any("is empty" in line for line in logged)


def test_text_view_gives_each_patch_its_similarity_to_the_words(tmp_path):
    _images(tmp_path / "images", 1)
    backbone = _backbone(depth=2)
    text = TextAlignedModel(
        backbone,
        VisionHead(48, num_heads=2, blocks=1),
        TextTransformer(width=32, layers=1, heads=2, embed_dim=96, context_length=16),
    ).eval()
    viewer = FeatureViewer(
        backbone, MEAN, STD, name="tiny", resolution=RESOLUTION, images=tmp_path / "images", text_model=text
    )
    answer = viewer.text_similarity("scene0.png", "  a red square ")
    image = eval_transform(RESOLUTION, MEAN, STD)(decode_image(tmp_path / "images" / "scene0.png"))[None]
    patches = text.encode_image_dense(image)[1][0]
    expected = text.patch_text_similarity(patches, text.encode_text(["a red square"]))[..., 0].flatten()
    assert answer["text"] == "a red square" and (answer["h"], answer["w"]) == (4, 4)
    torch.testing.assert_close(torch.tensor(answer["values"]), expected, atol=1e-5, rtol=0)
    assert viewer.info()["text"] is True
    assert viewer.text_similarity("scene0.png", "a blue circle")["values"] != answer["values"]


def test_view_command_serves_a_named_architecture_and_refuses_bad_settings(tmp_path):
    from opendino.cli import main

    assert main(["view", "vits16", "--port", "0", "--resolution", "100"]) == 2  # not a multiple of 16
    assert main(["view", "nonsense_model", "--port", "0"]) == 2
    assert main(["view", "vits16", "--images", str(tmp_path / "missing"), "--port", "0"]) == 2
    model = _backbone(depth=1)
    save_model(model, tmp_path / "tiny.safetensors")
    _images(tmp_path / "images", 1)
    command = [sys.executable, "-m", "opendino", "view", str(tmp_path / "tiny.safetensors"), "--port", "0"]
    server = subprocess.Popen(
        [*command, "--images", str(tmp_path / "images"), "--resolution", "32"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:"), line
        url = line.split()[1]
        status, info = _call(url + "/api/info")
        assert status == 200 and info["model"].endswith("tiny.safetensors") and info["resolution"] == 32
        status, _ = _call(url + "/api/upload", b"junk", raw=True)
        assert status == 400 and server.poll() is None  # refused, still up
    finally:
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert "refused (400)" in err


# -- the page in a real browser -------------------------------------------------------------------------------
def _chrome():
    """A headless Chromium driven by Selenium, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("Chromium or its driver is missing (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,1250",
    ):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def _wait(driver, script: str, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"the page never gave {script!r}; error shown: {driver.find_element('id', 'error').text!r}")


def test_the_page_in_headless_chromium_shows_what_the_model_computes(tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    model = _backbone()
    paths = _images(tmp_path / "images")
    (tmp_path / "notes.txt").write_text("not an image")
    viewer = FeatureViewer(model, MEAN, STD, name="tiny ViT", resolution=RESOLUTION, images=tmp_path / "images")
    driver = _chrome()
    try:
        with running(viewer) as url:
            driver.get(url)
            _wait(driver, "return document.body.dataset.ready")
            assert driver.find_element(By.ID, "model").text == "tiny ViT"
            driver.find_element(By.ID, "file-a").send_keys(str(paths[0]))
            _wait(driver, "return window.lastFeatures.a")
            Select(driver.find_element(By.ID, "pick-b")).select_by_value("scene1.png")
            _wait(driver, "return window.lastFeatures.b")
            row, col = 1, 2
            image = driver.find_element(By.ID, "image-a")
            side = image.size["width"]
            offset = ((col + 0.5) * side / 4 - side / 2, (row + 0.5) * side / 4 - side / 2)  # from the centre
            ActionChains(driver).move_to_element_with_offset(image, *map(int, offset)).click().perform()
            sent = _wait(driver, "return window.lastSimilarity")
            assert (sent["panel"], sent["row"], sent["col"]) == ("a", row, col)
            expected, _, rows = _direct_similarity(model, paths[0], 2, row, col)
            torch.testing.assert_close(torch.tensor(sent["values"]), expected, atol=1e-5, rtol=0)
            towards = _direct_similarity(model, paths[1], 2, 0, 0)[2] @ rows[row * 4 + col]
            torch.testing.assert_close(torch.tensor(sent["other"]["values"]), towards, atol=1e-5, rtol=0)
            # the picture shows those values: each patch's colour is the colour map at its similarity
            painted = driver.execute_script(
                "const g = document.getElementById('sim-a').getContext('2d');"
                "return [...Array(16).keys()].map(k => Array.from("
                "g.getImageData((k % 4) * 80 + 40, Math.floor(k / 4) * 80 + 40, 1, 1).data.slice(0, 3)));"
            )
            colours = viewer.info()["colormap"]
            for value, rgb in zip(sent["values"], painted, strict=True):
                assert rgb == colours[round((value + 1) / 2 * 255)]
            # a bad upload: a clear message on the page, and the page keeps working
            driver.find_element(By.ID, "file-b").send_keys(str(tmp_path / "notes.txt"))
            message = _wait(driver, "return document.getElementById('error').textContent")
            assert "notes.txt" in message and "not an image" in message
            driver.execute_script("window.lastSimilarity = null")
            ActionChains(driver).move_to_element_with_offset(image, 20, 20).click().perform()  # patch (2, 2)
            again = _wait(driver, "return window.lastSimilarity")
            assert (again["row"], again["col"]) == (2, 2) and driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()


@pytest.mark.slow
def test_screenshot_of_a_trained_model():
    """The README's screenshot: ``OPENDINO_SCREENSHOT=docs/pictures/viewer.png OPENDINO_VIEW_MODEL=demo_out/text
    OPENDINO_VIEW_IMAGES=FOLDER pytest -m slow tests/test_view.py -k screenshot`` (the first two images of the
    folder, a click on ``OPENDINO_VIEW_PATCH`` (ROW,COL; default the centre) and, for a text-aligned run,
    ``OPENDINO_VIEW_TEXT`` typed; ``OPENDINO_VIEW_RESOLUTION``: the input size)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    target, source = os.environ.get("OPENDINO_SCREENSHOT"), os.environ.get("OPENDINO_VIEW_MODEL")
    if not target or not source:
        pytest.skip("set OPENDINO_SCREENSHOT and OPENDINO_VIEW_MODEL (and OPENDINO_VIEW_IMAGES) to take it")
    resolution = int(os.environ.get("OPENDINO_VIEW_RESOLUTION", 0)) or None
    viewer = FeatureViewer.from_source(source, images=os.environ.get("OPENDINO_VIEW_IMAGES"), resolution=resolution)
    driver = _chrome()
    try:
        with running(viewer) as url:
            driver.get(url)
            _wait(driver, "return document.body.dataset.ready")
            names = viewer.info()["images"]
            for panel, name in zip("ab", names[:2], strict=True):
                Select(driver.find_element(By.ID, f"pick-{panel}")).select_by_value(name)
                _wait(driver, f"return window.lastFeatures.{panel}")
            grid = driver.execute_script("return window.lastFeatures.a")
            row, col = map(int, os.environ.get("OPENDINO_VIEW_PATCH", f"{grid['h'] // 2},{grid['w'] // 2}").split(","))
            image = driver.find_element(By.ID, "image-a")
            side = image.size["width"]
            x = (col + 0.5) * side / grid["w"] - side / 2
            y = (row + 0.5) * side / grid["h"] - side / 2
            ActionChains(driver).move_to_element_with_offset(image, int(x), int(y)).click().perform()
            _wait(driver, "return window.lastSimilarity")
            if viewer.text_model is not None and os.environ.get("OPENDINO_VIEW_TEXT"):
                driver.find_element(By.ID, "text").send_keys(os.environ["OPENDINO_VIEW_TEXT"] + "\n")
                _wait(driver, "return window.lastText && window.lastText.a")
            driver.save_screenshot(target)
    finally:
        driver.quit()
    assert Path(target).stat().st_size > 10_000

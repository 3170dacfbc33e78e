"""`geodistill demo`: the checks and answers without a browser (fast), then the page itself driven in
Debian's headless chromium through Selenium (slow: Gradio's import and the browser start take seconds).

The browser tests need `chromium` and `chromium-driver` (apt; .ci/run installs them); without them they
skip, except under CI, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from geodistill import cli
from geodistill.data.records import Record, Turn
from geodistill.errors import DataError, GeodistillError, ModelError
from geodistill.eval import chat
from geodistill.eval.demo import core
from geodistill.eval.demo.page import Page, Source, format_stats

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WIDTH = 1400
"""Browser window width in pixels (the screenshot's width)."""
BOXES = "<p>a red ship</p> {<10><10><50><40>|<30>}{<60><60><90><90>}"


def rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_arch, make_world):
    """(prepared folder, [(name, model folder)] x 3): 3 synthetic test images and three random tiny models
    of different widths (teacher, baseline, distilled)."""
    archs = [(name, tiny_arch(hidden_size=w, intermediate_size=2 * w))
             for name, w in [("teacher", 64), ("baseline", 32), ("distilled", 32)]]  # fmt: skip
    prepared, models = make_world(tmp_path_factory.mktemp("demo"), 64, archs)
    return prepared, list(models.items())


@pytest.fixture(scope="module")
def page(world):
    prepared, specs = world
    return Page(core.load_models(specs), core.load_test_items(prepared), max_new_tokens=12)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "scene.png"
    Image.new("RGB", (80, 60), (30, 60, 120)).save(path)
    return path


def bad_files(tmp_path: Path, image: Path) -> dict[str, Path]:
    """A text file named .png, a PNG cut in half, and a 1-bit PNG of 4097 x 4096 pixels (small on disk)."""
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image\n")
    truncated = tmp_path / "truncated.png"
    big = tmp_path / "big.png"
    Image.effect_noise((200, 200), 50).convert("RGB").save(big)  # noise: the PNG has many chunks to cut
    truncated.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    Image.new("1", (4097, 4096)).save(big)
    return {"not an image": not_image, "truncated": truncated, "over the limit": big}


# ------------------------------------------------------------------------------------------ pure parts


def test_read_image_accepts_images_and_explains_bad_files(tmp_path, image):
    assert core.read_image(image).size == (80, 60)
    for expected, path in bad_files(tmp_path, image).items():
        with pytest.raises(DataError) as e:
            core.read_image(path)
        message = str(e.value)
        assert path.name in message and (expected in message or "cannot be decoded" in message), message
    with pytest.raises(DataError, match="80 x 60 = 4,800 pixels is over the limit of 4,799"):
        core.read_image(image, max_pixels=4799)


def test_question_checks():
    assert core.question_turn("  [grounding] ships ") == Turn("human", "<image>\n[grounding] ships")
    assert core.question_turn("<image> what?").value == "<image> what?"
    for empty in ("", "   ", None):
        with pytest.raises(GeodistillError, match="the question is empty"):
            core.question_turn(empty)
    with pytest.raises(GeodistillError, match="2 <image> placeholders"):
        core.question_turn("<image> and <image>")


def test_model_specs_and_missing_folders(tmp_path):
    assert core.parse_model_spec("kd=models/student_kd") == ("kd", Path("models/student_kd"))
    assert core.parse_model_spec("models/teacher") == ("teacher", Path("models/teacher"))
    with pytest.raises(GeodistillError, match="NAME=DIR"):
        core.parse_model_spec("kd=")
    with pytest.raises(ModelError) as e:
        core.check_model_folders([("a", tmp_path), ("a", tmp_path / "x"), ("b", tmp_path / "y")])
    assert "'a' is given twice" in str(e.value) and "x does not exist" in str(e.value)
    assert "y does not exist" in str(e.value) and "dvc repro" in str(e.value)
    with pytest.raises(ModelError, match="no model to show"):
        core.check_model_folders([])
    assert core.default_specs({"t": tmp_path, "s": tmp_path / "nope"}) == [("t", tmp_path)]


def test_cli_demo_refuses_to_start_without_its_models(tmp_path, capsys, monkeypatch):
    rc = cli.main(["demo", "--model", f"teacher={tmp_path / 'gone'}", "--model", f"kd={tmp_path / 'kd'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "teacher:" in err and "gone does not exist" in err and "kd does not exist" in err
    monkeypatch.chdir(tmp_path)  # no models/ here: the pipeline's default models do not exist
    assert cli.main(["demo"]) == 2
    assert "no model to show" in capsys.readouterr().err
    assert cli.main(["demo", "--model", str(tmp_path), "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err


def record(task: str, question: str, answer: str, meta: dict) -> Record:
    turns = (Turn("human", f"<image>\n{question}"), Turn("gpt", answer))
    return Record("r1", "images/x.png", "x", task, turns, meta)


def test_score_uses_the_evaluation_metrics():
    scene = record("scene", "Classify: a, b", "forest", {"label": "forest", "classes": ["forest", "water"]})
    assert core.score(scene, "Forest.") == core.Score(True, "correct")
    assert core.score(scene, "water").correct is False
    vqa = record("vqa", "Is there a ship?", "yes", {"qtype": "presence"})
    assert core.score(vqa, "Yes, there is.").correct is True
    assert core.score(vqa, "no") == core.Score(False, "wrong (truth: yes)")
    meta = {"boxes": ["{<0><0><50><50>}"], "width": 64, "height": 64}
    refer = record("referring", "[refer] <p>the ship</p>", "{<0><0><50><50>}", meta)
    exact = core.score(refer, "<p>the ship</p> {<0><0><50><50>}")
    assert exact == core.Score(True, "IoU 1.00 · 1/1 boxes at IoU ≥ 0.5")
    half = core.score(refer, "{<0><0><50><25>}")  # half the box: IoU 0.5 still matches
    assert half.correct is True and half.text.startswith("IoU 0.50")
    miss = core.score(refer, "no idea")
    assert miss.correct is False and "IoU 0.00 · 0/1" in miss.text and "no box" in miss.text
    caption = record("region_caption", "[identify] {<0><0><9><9>}", "a red ship", {"refs": ["a red ship"]})
    assert core.score(caption, "a ship").correct is None
    assert core.score(None, "anything") is None
    broken = record("referring", "[refer] <p>x</p>", "{<0><0><5><5>}", {"boxes": ["{<0><0><5><5>}"]})
    assert "cannot score" in core.score(broken, "{<0><0><5><5>}").text  # no width/height in meta


def test_truth_drawing_labels_boxes_with_the_phrase_or_the_caption():
    refer = record("referring", "[refer] <p>the ship</p>", "{<0><0><50><50>}", {})
    assert core.truth_drawing(refer) == "<p>the ship</p> {<0><0><50><50>}"
    caption = record("region_caption", "[identify] {<1><2><3><4>}", "a red ship", {})
    assert core.truth_drawing(caption) == "<p>a red ship</p> {<1><2><3><4>}"
    assert core.truth_drawing(record("vqa", "How many?", "2", {})) == ""


def test_test_items_templates_and_ground_truth(world):
    prepared, _ = world
    items = core.load_test_items(prepared)
    assert items and all(i.image.is_file() for i in items)
    assert len(core.load_test_items(prepared, limit=2)) == 2
    templates = core.task_templates(items)
    refer = next(i for i in items if i.record.task == "referring")
    assert templates["referring"] == refer.question and "<image>" not in refer.question
    scene = next(i for i in items if i.record.task == "scene")
    assert templates["scene classification"] == scene.question
    assert scene.question.startswith("Classify the image in the following classes: ")
    assert templates["grounding"] == "[grounding] Describe the image in detail."  # no such test record
    assert templates["free text"] == ""
    assert core.truth_for(refer, refer.question + "  ") is refer.record
    assert core.truth_for(refer, "[refer] <p>something else</p>") is None
    assert core.truth_for(None, refer.question) is None
    with pytest.raises(DataError, match=r"test\.jsonl not found"):
        core.load_test_items(prepared / "images")


def test_answers_are_drawn_in_chat_colours(page, image, monkeypatch):
    monkeypatch.setattr(chat, "generate", lambda *a, **k: ([BOXES], 0.25))
    picture = core.read_image(image)
    answers = core.answer_all(page.models, picture, core.question_turn("[grounding] ships"))
    assert [a.name for a in answers] == ["teacher", "baseline", "distilled"]
    for a in answers:
        assert a.answer == BOXES and a.n_boxes == 2 and a.error is None and a.score is None
        colours = {c for _, c in a.drawn.getcolors(maxcolors=1 << 16)}
        assert rgb(chat.COLOURS[0]) in colours and (30, 60, 120) in colours
        assert a.tokens > 0 and a.tokens_per_s == a.tokens / 0.25
        assert format_stats(a).startswith(f"0.25 s · {a.tokens} tokens · ") and "2 boxes" in format_stats(a)
    assert picture.getcolors() == [(80 * 60, (30, 60, 120))]  # the user's image is never drawn on


def test_page_actions_report_bad_input_and_keep_answering(page, image, tmp_path):
    n = len(page.models)
    for expected, path in bad_files(tmp_path, image).items():
        source, preview, _, status, *_ = page.upload(str(path))
        assert source is None and preview is None and "demo-error" in status, expected
    status, *outs = page.ask(None, "What is it?")
    assert "no image yet" in status and outs[2:] == [None, "", ""] * n
    source, preview, *_ = page.upload(str(image))
    assert source == Source(str(image)) and min(preview.size) >= chat.MIN_DRAW_SIDE
    for question, message in [("  ", "the question is empty"), ("<image><image> x", "2 &lt;image&gt;")]:
        status, *_ = page.ask(source, question)
        assert message in status
    status, truth, truth_img, *outs = page.ask(source, "[grounding] Describe the image in detail.")
    assert "3 answers to: [grounding] Describe the image in detail. (no ground truth: an upload)" in status
    assert truth is None and truth_img is None and len(outs) == 3 * n
    for drawn, answer, stats in zip(outs[::3], outs[1::3], outs[2::3], strict=True):
        assert isinstance(drawn, Image.Image) and isinstance(answer, str) and "tokens/s" in stats


def test_page_shows_ground_truth_of_a_test_item(page):
    label = next(lb for lb, it in page.items.items() if it.record.task == "referring")
    source, _, upload, question, status, truth, truth_img = page.pick(label)
    assert source.item == label and upload is None and status == "" and "Ground truth" in truth
    assert question == page.items[label].question and truth_img is not None
    status, truth, truth_img, *outs = page.ask(source, question)
    assert "Ground truth</b> (referring)" in truth and truth_img is not None
    assert all("boxes at IoU ≥ 0.5" in stats for stats in outs[2::3])
    status, truth, truth_img, *outs = page.ask(source, question + " please")  # edited: no ground truth
    assert "the question was edited" in status and truth is None and truth_img is None
    assert "IoU" not in outs[2]
    assert "no test item" in page.pick("nothing like this")[4]


# ------------------------------------------------------------------------------------------- browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(page):
    """The demo served on a free local port for this module's browser tests."""
    from geodistill.eval.demo.app import serve

    port = free_port()
    app = serve(page, host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}"
    app.close()


@pytest.fixture
def browser():
    """Debian's chromium, headless, through its matching chromedriver (given by path, so Selenium Manager
    never runs and nothing is downloaded); every request the page makes is logged."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        why = "needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):  # .ci/run installs them: a skip there would hide the browser tests
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WIDTH},1200"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str, timeout: float = 60.0):
    """Poll ``condition(driver)`` until it is truthy; else fail naming ``what`` (with the page status)."""
    from selenium.common.exceptions import WebDriverException

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = condition(driver)
            if value:
                return value
        except WebDriverException:
            pass  # the element is not there yet, or was just re-rendered
        time.sleep(0.2)
    status = driver.find_element("id", "status").text
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}; page status: {status!r}")


def el(driver, css: str):
    return driver.find_element("css selector", css)


def requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def upload(driver, path: Path) -> None:
    el(driver, "#upload input[type=file]").send_keys(str(path))


def ask(driver, question: str) -> None:
    box = el(driver, "#question textarea")
    box.clear()
    box.send_keys(question)
    el(driver, "#ask").click()


def answered(n: int, driver) -> bool:
    return all("tokens/s" in el(driver, f"#stats-{i}").text for i in range(n))


PAGE_HEIGHT_JS = """return Math.max(...[document.body, document.documentElement,
    document.querySelector('gradio-app')].filter(Boolean).map(e => e.scrollHeight)) + 20"""


def save_screenshot(driver, name: str) -> Path:
    """The whole page (the window grown to its height) as reports/<name>."""
    out = ROOT / "reports" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script(PAGE_HEIGHT_JS)
    metrics = {"width": WIDTH, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)  # a viewport as tall as the page
    driver.save_screenshot(str(out))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return out


@pytest.mark.slow
def test_browser_grounding_question_gets_three_answers_with_boxes(server, browser, page, image, monkeypatch):
    """Upload, ask a grounding question, see three answers and their box overlays; the page fetches
    nothing from any other host. The real models answer; a fixed grounded phrase is appended to each
    answer so that random tiny models still give boxes to draw."""
    real = chat.generate

    def grounded(*args, **kwargs):
        answers, seconds = real(*args, **kwargs)
        return [f"{a} {BOXES}" for a in answers], seconds

    monkeypatch.setattr(chat, "generate", grounded)
    browser.get(server)
    wait_for(browser, lambda d: el(d, "#upload input[type=file]"), "the upload field")
    upload(browser, image)
    wait_for(browser, lambda d: el(d, "#preview img"), "the preview of the upload")
    ask(browser, "[grounding] Describe the image in detail.")
    wait_for(browser, lambda d: answered(3, d), "three answers")
    for i in range(3):
        assert BOXES in el(browser, f"#answer-{i} textarea").get_attribute("value")
        assert "2 boxes" in el(browser, f"#stats-{i}").text
        src = wait_for(browser, lambda d, i=i: el(d, f"#boxes-{i} img").get_attribute("src"), f"image {i}")
        with urllib.request.urlopen(src) as r:  # the very file the page shows
            shown = Image.open(r).convert("RGB")
        colours = {c for _, c in shown.getcolors(maxcolors=1 << 20)}
        assert rgb(chat.COLOURS[0]) in colours and (30, 60, 120) in colours, f"no box overlay in image {i}"
    save_screenshot(browser, "demo.png")
    urls = requested_urls(browser)
    foreign = [u for u in urls if not u.startswith((server, "data:", "blob:"))]
    assert urls and not foreign, f"the page loaded from other hosts: {foreign}"


@pytest.mark.slow
def test_browser_bad_upload_shows_an_error_and_the_page_keeps_working(server, browser, image, tmp_path):
    """A non-image gives a message in the page; a held-out test item picked next is answered and scored."""
    browser.get(server)
    wait_for(browser, lambda d: el(d, "#upload input[type=file]"), "the upload field")
    upload(browser, bad_files(tmp_path, image)["not an image"])
    wait_for(browser, lambda d: "not an image" in el(d, "#status").text, "the not-an-image message")
    save_screenshot(browser, "demo_bad_input.png")
    from selenium.webdriver.common.keys import Keys

    pick = el(browser, "#pick input")
    pick.click()
    pick.send_keys("referring")  # filters the list to the referring items
    pick.send_keys(Keys.ARROW_DOWN, Keys.ENTER)
    question = lambda d: el(d, "#question textarea").get_attribute("value")  # noqa: E731
    wait_for(browser, lambda d: "[refer]" in question(d), "the picked item's question")
    wait_for(browser, lambda d: "Ground truth" in el(d, "#truth").text, "the ground truth")
    assert el(browser, "#status").text == ""  # the error is gone
    el(browser, "#ask").click()
    wait_for(browser, lambda d: answered(3, d), "three answers")
    assert all("boxes at IoU ≥ 0.5" in el(browser, f"#stats-{i}").text for i in range(3))
    assert el(browser, "#truth-img img").get_attribute("src")

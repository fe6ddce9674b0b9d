"""The search page in headless Chromium (Playwright): type a query, see thumbnails, upload and drop
an image, click "more like this", switch to caption results; every request stays on the server."""
import base64
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing; run: pip install playwright")

from _search_fixtures import build_search_fixture, start_server  # noqa: E402

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'

CHROMIUM = os.environ.get("CLIPFORGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOT = os.environ.get("CLIPFORGE_PAGE_SCREENSHOT")  # set to a .png path to keep a screenshot


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"{CHROMIUM} missing; run: apt-get install -y chromium")
    fixture = build_search_fixture(tmp_path_factory.mktemp("page"))
    live = start_server(fixture)
    yield fixture, live
    live.stop()


@pytest.fixture(scope="module")
def page(served):
    _, live = served
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        tab = context.new_page()
        tab.requests = []
        tab.on("request", lambda request: tab.requests.append(request.url))
        tab.errors = []
        tab.on("pageerror", lambda error: tab.errors.append(str(error)))
        tab.goto(live.url + "/")
        yield tab
        browser.close()


def card_ids(page):
    return [int(value) for value in page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.id)")]


def wait_for_status(page, text):
    page.wait_for_function("text => document.getElementById('status').textContent.includes(text)", arg=text,
                           timeout=30000)


def test_text_query_shows_thumbnails_with_captions_and_scores(page, served):
    page.wait_for_function("() => document.querySelectorAll('#collection option').length === 2")
    page.fill("#query", "a blue square")
    page.press("#query", "Enter")
    wait_for_status(page, '"a blue square"')
    page.wait_for_function("() => [...document.querySelectorAll('.card img')].some(i => i.complete && i.naturalWidth > 0)")
    assert len(card_ids(page)) >= 5
    assert page.text_content(".card .caption")
    assert page.text_content(".card .score").startswith("#")
    assert "accepted by the API and ignored" in page.text_content("footer")
    if SCREENSHOT:
        page.wait_for_timeout(300)
        page.screenshot(path=SCREENSHOT, full_page=False)


def test_uploaded_image_finds_itself_then_more_like_this(page, served):
    fixture, _ = served
    page.set_input_files("#upload", fixture.rows.image_paths[13])  # the purple square
    wait_for_status(page, "purple-square.png")
    assert card_ids(page)[0] == 13
    assert page.is_visible("#query-preview img")
    second = card_ids(page)[1]
    page.click(f".card[data-id='{second}'] .more-like-this")
    wait_for_status(page, f"more like #{second}")
    assert second in card_ids(page)[:2]  # itself (or its stored duplicate) first


def test_dropped_image_is_searched(page, served):
    fixture, _ = served
    encoded = base64.b64encode(Path(fixture.rows.image_paths[22]).read_bytes()).decode()  # the cyan square
    page.evaluate("""encoded => {
        const bytes = Uint8Array.from(atob(encoded), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        window.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", encoded)
    wait_for_status(page, "dropped.png")
    assert card_ids(page)[0] == 22


def test_switching_to_caption_results_and_folding(page):
    page.fill("#query", "a red circle")
    page.press("#query", "Enter")
    wait_for_status(page, '"a red circle"')
    page.click("#mode-text")
    wait_for_status(page, "captions for")
    assert page.query_selector(".card.text-result") is not None
    page.click("#mode-image")
    wait_for_status(page, "images for")
    page.evaluate("similar(0)")  # the red circle, stored twice (ids 0 and 24)
    wait_for_status(page, "more like #0")
    ids = card_ids(page)
    assert len({0, 24} & set(ids)) == 1  # the stored duplicate is folded into one card
    assert "near-duplicate" in page.text_content(f".card[data-id='{ids[0]}'] .folded")
    page.uncheck("#dedup")
    page.wait_for_function("() => [...document.querySelectorAll('.card')]"
                           ".filter(c => ['0', '24'].includes(c.dataset.id)).length === 2")


def test_page_loads_nothing_from_elsewhere_and_raises_no_script_error(page, served):
    _, live = served
    assert page.errors == []
    foreign = [url for url in page.requests if not url.startswith((live.url, "data:", "blob:"))]
    assert foreign == []

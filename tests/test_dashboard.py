"""The browser dashboard in a real headless Chromium, against a real server and SDK training.

Needs Debian's Chromium at /usr/bin/chromium (or TRAINPULSE_CHROMIUM):
`apt-get install -y chromium chromium-driver`. Playwright's own browser download is not used.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from tinker import types

from conftest import API_KEY, ARTIFACTS, TINY, make_client

CHROMIUM = os.environ.get("TRAINPULSE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
STEPS = 8
WAIT_MS = 30_000


def _datum(tokens: list[int]) -> types.Datum:
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})


def _train(training, batch: list[types.Datum], steps: int) -> None:
    for _ in range(steps):
        forward_backward = training.forward_backward(batch, "cross_entropy")
        optim = training.optim_step(types.AdamParams(learning_rate=5e-3))
        forward_backward.result()
        optim.result()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}; install it with "
                    "`apt-get install -y chromium chromium-driver` or set TRAINPULSE_CHROMIUM")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.page_errors = errors
    yield opened
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def _new_trainer(server, seed: int) -> dict:
    trainer = make_client(server).create_lora_training_client(base_model=TINY, rank=8, seed=seed)
    tokenizer = trainer.get_tokenizer()
    batch = [_datum(tokenizer.encode("The capital of France is Paris.")),
             _datum(tokenizer.encode("Two plus two equals four."))]
    return {"trainer": trainer, "batch": batch, "model_id": trainer.model_id}


@pytest.fixture(scope="module")
def trained(server):
    """A LoRA model on the shared server, trained for STEPS steps before any page opens."""
    training = _new_trainer(server, seed=6)
    _train(training["trainer"], training["batch"], STEPS)
    return training


def _open(page: Page, url: str) -> None:
    page.goto(url)
    page.wait_for_function("window.trainpulse && window.trainpulse.ready()", timeout=WAIT_MS)


def _rows_of_model(page: Page, model_id: str, kind: str):
    return (page.locator("#jobs-body tr")
            .filter(has=page.locator(f'td.job-model[title="{model_id}"]'))
            .filter(has=page.locator('td[data-label="Kind"]', has_text=re.compile(f"^{kind}$"))))


def test_training_appears_live_and_charts_every_step(server, page):
    training = _new_trainer(server, seed=5)
    model_id = training["model_id"]
    _open(page, server.url(f"/#models={model_id}"))

    _train(training["trainer"], training["batch"], STEPS)

    optim_rows = _rows_of_model(page, model_id, "optim_step")
    page.wait_for_function(f"trainpulse.chartPoints('loss') === {STEPS}", timeout=WAIT_MS)
    expect(optim_rows).to_have_count(STEPS, timeout=WAIT_MS)
    for index in range(STEPS):
        row = optim_rows.nth(index)
        expect(row).to_have_attribute("data-state", "succeeded", timeout=WAIT_MS)
        expect(row.locator(".state")).to_have_text("succeeded")
        expect(row.locator(".progress-bar")).to_have_attribute("aria-valuenow", "100")
    forward_rows = _rows_of_model(page, model_id, "forward_backward")
    expect(forward_rows).to_have_count(STEPS, timeout=WAIT_MS)
    expect(forward_rows.first.locator(".progress-text")).to_have_text("1/1", timeout=WAIT_MS)

    names = page.evaluate("[...document.querySelectorAll('#charts figure')].map((figure) => figure.dataset.metric)")
    assert names[:4] == ["loss", "learning_rate", "grad_norm", "tokens_per_s"]
    assert page.evaluate(f"trainpulse.seriesLength('{model_id}', 'loss')") == STEPS
    assert page.evaluate("trainpulse.chartPoints('learning_rate')") == STEPS
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-training.png"), full_page=True)


def test_reload_and_replay_add_no_duplicate_points(server, trained, page):
    model_id = trained["model_id"]
    _open(page, server.url(f"/#models={model_id}"))
    page.wait_for_function("trainpulse.chartPoints('loss') > 0", timeout=WAIT_MS)
    points = page.evaluate("trainpulse.chartPoints('loss')")
    assert points == page.evaluate(f"trainpulse.store.lastStep('{model_id}')")

    page.reload()
    page.wait_for_function("window.trainpulse && window.trainpulse.ready()", timeout=WAIT_MS)
    page.wait_for_function(f"trainpulse.chartPoints('loss') === {points}", timeout=WAIT_MS)

    # Reconnect from an early event id: the server replays the whole run, which the page has.
    page.evaluate("trainpulse.stream.lastEventId = 1; trainpulse.stream.open()")
    page.wait_for_function("document.getElementById('status-connection').dataset.state === 'live'",
                           timeout=WAIT_MS)
    _train(trained["trainer"], trained["batch"], 2)
    page.wait_for_function(f"trainpulse.chartPoints('loss') === {points + 2}", timeout=WAIT_MS)
    assert page.evaluate(f"trainpulse.seriesLength('{model_id}', 'loss')") == points + 2
    steps = page.evaluate(f"trainpulse.store.series('{model_id}', 'loss').steps")
    assert steps == sorted(set(steps))


def test_zoom_survives_new_points(server, trained, page):
    model_id = trained["model_id"]
    _open(page, server.url(f"/#models={model_id}"))
    page.wait_for_function(f"trainpulse.chartPoints('loss') >= {STEPS}", timeout=WAIT_MS)
    before = page.evaluate("trainpulse.chartPoints('loss')")

    over = page.locator('#charts figure[data-metric="loss"] .u-over')
    box = over.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    zoomed = page.evaluate("(() => { const s = trainpulse.charts.charts.get('loss').plot.scales.x; "
                           "return [s.min, s.max]; })()")
    assert page.evaluate("trainpulse.charts.charts.get('loss').zoomed") is True

    _train(trained["trainer"], trained["batch"], 1)
    page.wait_for_function(f"trainpulse.chartPoints('loss') === {before + 1}", timeout=WAIT_MS)
    after = page.evaluate("(() => { const s = trainpulse.charts.charts.get('loss').plot.scales.x; "
                          "return [s.min, s.max]; })()")
    assert after == zoomed

    page.click("#reset-zoom")
    page.wait_for_function(f"trainpulse.charts.charts.get('loss').plot.scales.x.max === {before + 1}",
                           timeout=WAIT_MS)
    assert page.evaluate("trainpulse.charts.charts.get('loss').zoomed") is False


def test_drawing_pauses_while_hidden(server, trained, page):
    model_id = trained["model_id"]
    _open(page, server.url(f"/#models={model_id}"))
    page.wait_for_function(f"trainpulse.chartPoints('loss') >= {STEPS}", timeout=WAIT_MS)
    before = page.evaluate("trainpulse.chartPoints('loss')")

    # Headless Chromium keeps every tab visible, so the test overrides document.hidden and sends
    # the visibilitychange event that a browser sends when the tab goes to the background.
    page.evaluate("Object.defineProperty(document, 'hidden', {configurable: true, get: () => true});"
                  "document.dispatchEvent(new Event('visibilitychange'))")
    frames = page.evaluate("trainpulse.scheduler.frames")
    _train(trained["trainer"], trained["batch"], 1)
    page.wait_for_function(f"trainpulse.seriesLength('{model_id}', 'loss') === {before + 1}", timeout=WAIT_MS)
    time.sleep(0.5)
    assert page.evaluate("trainpulse.scheduler.frames") == frames
    assert page.evaluate("trainpulse.chartPoints('loss')") == before

    page.evaluate("delete document.hidden; document.dispatchEvent(new Event('visibilitychange'))")
    page.wait_for_function(f"trainpulse.chartPoints('loss') === {before + 1}", timeout=WAIT_MS)
    assert page.evaluate("trainpulse.scheduler.frames") > frames


def test_cancel_button_cancels_running_job(fresh_server, page):
    # 64-token micro-batches turn one forward_backward of long examples into many slow chunks.
    running = fresh_server(env={"TRAINPULSE_MICRO_BATCH_TOKENS": "64"})
    trainer = make_client(running).create_lora_training_client(base_model=TINY, rank=4, seed=1)
    model_id = trainer.model_id
    _open(page, running.url(f"/#models={model_id}"))

    # 1,000 examples stay under the SDK's 1,024-datum chunk, so this is a single job.
    long_batch = [_datum([(11 + index + offset) % 4000 + 10 for offset in range(60)]) for index in range(1000)]
    submitted = threading.Thread(target=trainer.forward_backward, args=(long_batch, "cross_entropy"), daemon=True)
    submitted.start()

    row = _rows_of_model(page, model_id, "forward_backward").first
    expect(row).to_have_attribute("data-state", "running", timeout=WAIT_MS)
    page.wait_for_function(
        "(() => { const row = document.querySelector('#jobs-body tr[data-state=running]');"
        " return row && /\\d+\\/\\d+/.test(row.querySelector('.progress-text').textContent); })()",
        timeout=WAIT_MS)
    job_id = row.get_attribute("data-job-id")
    row = page.locator(f'#jobs-body tr[data-job-id="{job_id}"]')

    # Keyboard only: the button takes focus and Enter presses it.
    row.locator("button.cancel").focus()
    page.keyboard.press("Enter")
    expect(row).to_have_attribute("data-state", "cancelled", timeout=WAIT_MS)
    expect(row.locator(".state")).to_have_text("cancelled")
    expect(row.locator("button.cancel")).to_be_hidden()
    record = httpx.get(running.url(f"/api/v1/jobs/{job_id}"), timeout=10).json()
    assert record["state"] == "cancelled"
    assert record["cancel_requested"] is True
    submitted.join(timeout=30)


def test_api_key_form_unlocks_rest_and_events(fresh_server, page):
    running = fresh_server(env={"TRAINPULSE_API_KEY": API_KEY})
    page.goto(running.url("/"))

    dialog = page.locator("#api-key-dialog")
    dialog.wait_for(state="visible", timeout=WAIT_MS)
    page.fill("#api-key-input", API_KEY)
    page.keyboard.press("Enter")
    dialog.wait_for(state="hidden", timeout=WAIT_MS)
    page.wait_for_function("window.trainpulse.ready()", timeout=WAIT_MS)
    page.wait_for_function("document.getElementById('status-connection').dataset.state === 'live'",
                           timeout=WAIT_MS)
    assert page.evaluate("sessionStorage.getItem('trainpulse.apiKey')") == API_KEY
    assert page.inner_text("#status-models") == "0"

    trainer = make_client(running).create_lora_training_client(base_model=TINY, rank=4, seed=2)
    create_row = _rows_of_model(page, trainer.model_id, "create_model")
    expect(create_row).to_have_attribute("data-state", "succeeded", timeout=WAIT_MS)
    expect(dialog).to_be_hidden()


def test_narrow_window_has_no_horizontal_scroll(server, trained, page):
    page.set_viewport_size({"width": 400, "height": 800})
    _open(page, server.url(f"/#models={trained['model_id']}"))
    page.wait_for_function(f"trainpulse.chartPoints('loss') >= {STEPS}", timeout=WAIT_MS)
    time.sleep(0.3)  # one more frame after the resize of the charts

    assert page.evaluate("document.documentElement.scrollWidth") <= 400
    chart_width = page.locator('#charts figure[data-metric="loss"]').bounding_box()["width"]
    assert chart_width <= 400
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-narrow.png"), full_page=True)

"""The web page in headless Chromium: upload the sample set, start a tiny job, watch the progress
bar reach 100% and the gallery fill, then generate with the LoRA. Screenshots go to
test-artifacts/serve/."""

from __future__ import annotations

from pathlib import Path

import pytest

from fluxray.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "pxco"
ARTIFACTS = REPO / "test-artifacts" / "serve"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


@pytest.fixture(scope="module")
def service(deploy_service, tmp_path_factory):
    from ray import serve

    # The demo's own settings (tiny.yaml as shipped): the page prefills them and draws the likeness curve.
    svc = deploy_service(tmp_path_factory.mktemp("serve-page"), quick=False)
    yield svc
    serve.delete("fluxray")


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        yield page
        browser.close()


def test_upload_train_watch_and_generate_from_the_page(service, page):
    from playwright.sync_api import expect

    page.goto(service.url + "/")
    # Prefilled from GET /v1/defaults: tiny.yaml's own demo settings.
    expect(page.locator("#steps")).to_have_value(str(load_config(REPO / "configs" / "tiny.yaml").train.steps))
    page.set_input_files("#images", sorted(str(p) for p in SAMPLES.glob("*.png")))
    page.set_input_files("#captions", str(SAMPLES / "captions.json"))
    page.fill("#trigger", "pxco")
    page.fill("#steps", "6")
    page.fill("#sample_every", "3")
    page.fill("#sample_prompts", "[trigger], professional portrait photo, high quality, detailed")
    page.screenshot(path=str(ARTIFACTS / "1-form.png"), full_page=True)

    page.click("#start")
    expect(page.locator("#dataset-report")).to_contain_text("18 images", timeout=60_000)
    expect(page.locator("#job")).to_be_visible()
    expect(page.locator("#job-list tbody tr")).to_have_count(1)
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100", timeout=300_000)
    expect(page.locator("#job-status")).to_have_text("SUCCEEDED", timeout=60_000)
    expect(page.locator("#gallery .step")).to_have_count(3)  # steps 0, 3 and 6
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].length === 3 && "
                           "[...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth === 64)")
    expect(page.locator("#loss-chart path.loss")).to_have_count(1)
    # tiny.yaml scores the previews' likeness: its curve is drawn beside the loss (steps 0, 3 and 6).
    expect(page.locator("#likeness-chart path.likeness")).to_have_count(1)
    assert len(page.locator("#likeness-chart path.likeness").get_attribute("d").split("L")) == 3
    page.screenshot(path=str(ARTIFACTS / "2-job.png"), full_page=True)

    job = page.locator("#job-id").inner_text()
    expect(page.locator(f'#lora option[value="{job}"]')).to_have_count(1)
    page.select_option("#lora", job)
    page.click("#generate-btn")
    expect(page.locator("#result")).to_be_visible(timeout=60_000)
    page.wait_for_function("document.querySelector('#result-img').naturalWidth === 64")
    expect(page.locator("#result-caption")).to_contain_text(job)
    # The form was prefilled with the job's preview settings: the image is the step-6 preview.
    same = page.evaluate("""() => {
        const pixels = (img) => {
            const c = document.createElement("canvas");
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            const g = c.getContext("2d"); g.drawImage(img, 0, 0);
            return Array.from(g.getImageData(0, 0, c.width, c.height).data);
        };
        const a = pixels(document.querySelector('#gallery [data-step="6"] img'));
        const b = pixels(document.querySelector("#result-img"));
        return a.length === 64 * 64 * 4 && a.every((v, i) => v === b[i]);
    }""")
    assert same
    page.screenshot(path=str(ARTIFACTS / "3-generate.png"), full_page=True)
    assert page.locator("#error").is_hidden()
    assert not page.errors

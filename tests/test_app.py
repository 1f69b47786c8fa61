"""The app: safe defaults, clear messages, and the page itself in headless Chromium."""

import contextlib
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_studio.errors import LoraStudioError
from lora_studio.ui.app import bundled_models_table, check_base_model, is_loopback, launch, parse_auth

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "runs" / "screenshots"  # kept for a look after a run
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lora_file(tmp_path):
    path = tmp_path / "adapter.safetensors"
    save_file(
        {"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(path)
    )
    return path


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::"])
def test_listening_on_the_network_needs_auth(host):
    with pytest.raises(LoraStudioError, match="without a password.*--auth user:password"):
        launch(host=host, open_browser=False, block=False)


def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_auth_parsing():
    assert parse_auth("me:s3:cret") == ("me", "s3:cret")
    assert parse_auth(None) is None
    for bad in ("nopassword", ":x", "me:"):
        with pytest.raises(LoraStudioError, match="user:password"):
            parse_auth(bad)


def test_bundled_models_are_listed():
    rows = {row[0]: row for row in bundled_models_table()}
    assert {"demo", "sd1", "sd2", "sd2-v", "sdxl"} <= set(rows)
    assert all(rows[f][2] == "ready" for f in ("sd1", "sd2", "sd2-v", "sdxl"))


def test_check_base_model_gives_a_sentence_not_a_traceback(lora_file, tmp_path):
    message = check_base_model(str(lora_file), allow_pickle=False)
    assert message.startswith("**Cannot use this base model.**") and "is a LoRA adapter" in message
    assert "Traceback" not in message
    assert "was not found" in check_base_model(str(tmp_path / "missing.safetensors"), False)
    assert "Enter `demo`" in check_base_model("  ", False)


def test_check_base_model_reports_the_family(tiny_folders):
    message = check_base_model(str(tiny_folders["sdxl"]), False)
    assert "SDXL (diffusers folder)" in message and "`epsilon`" in message


@pytest.fixture
def browser_page():
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is not installed: `apt-get install chromium` (.ci/run does this)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        yield page
        browser.close()


@contextlib.contextmanager
def app_page(page, auth=None):
    """The app served on a free loopback port, opened in `page`; closed afterwards."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    app = launch(port=port, auth=auth, open_browser=False, block=False)
    try:
        page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=60_000)
        yield page
    finally:
        app.close()


@pytest.mark.browser
def test_page_lists_models_and_checks_a_file(browser_page, lora_file):
    with app_page(browser_page) as page:
        page.get_by_role("tab", name="Models").click()
        table = page.locator("#bundled-models")
        table.get_by_text("sdxl", exact=True).first.wait_for(timeout=30_000)
        shown = table.inner_text()
        assert all(name in shown for name in ("demo", "sd1", "sd2", "sd2-v", "sdxl")), shown
        page.get_by_label("Base model").fill(str(lora_file))
        page.locator("#check-base").click()
        result = page.locator("#check-result")
        result.get_by_text("is a LoRA adapter").wait_for(timeout=30_000)
        assert "Traceback" not in result.inner_text()
        page.screenshot(path=str(SCREENSHOTS / "models-tab.png"), full_page=True)


@pytest.mark.browser
def test_page_asks_for_login_when_auth_is_set(browser_page):
    with app_page(browser_page, auth="me:s3cret") as page:
        page.get_by_label("username").fill("me")
        page.get_by_label("password").fill("wrong")
        page.get_by_role("button", name="Login").click()
        page.get_by_text("Incorrect Credentials").wait_for(timeout=15_000)
        assert page.locator("#bundled-models").count() == 0


@pytest.mark.browser
def test_dataset_tab_opens_demo_and_saves_an_edited_caption(browser_page, tmp_path, monkeypatch):
    from lora_studio.ui import dataset_tab

    monkeypatch.setattr(dataset_tab, "DATASETS_DIR", tmp_path / "datasets")
    with app_page(browser_page) as page:
        page.locator("#dataset-open").click()
        page.locator("#dataset-report").get_by_text("24 images").wait_for(timeout=30_000)
        thumbnails = page.locator("#dataset-gallery .thumbnail-item")
        assert thumbnails.count() == 24
        thumbnails.first.click()
        box = page.locator("#caption-edit textarea")
        page.wait_for_function("document.querySelector('#caption-edit textarea').value.startsWith('zkz')")
        box.fill("zkz, an edited caption")
        page.locator("#caption-save").click()
        page.locator("#dataset-status").get_by_text("Saved zkz_00_yellow_circle.txt").wait_for(timeout=30_000)
        saved = (tmp_path / "datasets" / "demo" / "zkz_00_yellow_circle.txt").read_text()
        assert saved == "zkz, an edited caption\n"
        page.screenshot(path=str(SCREENSHOTS / "dataset-tab.png"), full_page=True)


def short_demo_run(tmp_path, monkeypatch, steps: int):
    """A few steps of the demo preset into tmp_path/runs, which the Preview and Library tabs then list."""
    from lora_studio import train
    from lora_studio.config import load_preset
    from lora_studio.ui import preview_tab

    sets = [f"output_dir='{tmp_path / 'runs'}'", f"dataset.cache_dir='{tmp_path / 'cache'}'",
            f"optimizer.max_train_steps={steps}", "sample.every_n_steps=0", "save.every_n_steps=0"]  # fmt: skip
    monkeypatch.setattr(preview_tab, "RUNS_DIR", tmp_path / "runs")
    return train.run_training(load_preset("demo-cpu", sets))


@pytest.mark.browser
def test_preview_tab_renders_a_lora_at_two_strengths(browser_page, tmp_path, monkeypatch):
    import base64

    done = short_demo_run(tmp_path, monkeypatch, steps=8)
    with app_page(browser_page) as page:
        page.get_by_role("tab", name="Preview").click()
        page.locator("#preview-loras input").click()
        page.get_by_role("option", name=str(done.lora_path)).click()
        page.wait_for_function("document.querySelector('#preview-prompt textarea').value.startsWith('zkz')")
        page.locator("#preview-prompt textarea").fill("zkz, a red circle on a white background")

        def render(strength: str) -> bytes:
            page.locator("#preview-strength input[type=number]").fill(strength)
            page.locator("#preview-strength input[type=number]").press("Enter")
            page.locator("#preview-generate").click()
            page.wait_for_function(
                f"document.querySelector('#preview-parameters textarea').value.includes(':{strength}>')"
            )
            src = page.locator("#preview-image img").get_attribute("src")
            if src.startswith("data:"):
                return base64.b64decode(src.split(",", 1)[1])
            return page.request.get(src).body()

        at_zero, at_one = render("0"), render("1")
        assert at_zero and at_one and at_zero != at_one
        page.screenshot(path=str(SCREENSHOTS / "preview-tab.png"), full_page=True)


@pytest.mark.browser
def test_library_tab_shows_a_run_and_exports_it(browser_page, tmp_path, monkeypatch):
    from lora_studio.export import load_lora

    done = short_demo_run(tmp_path, monkeypatch, steps=4)
    with app_page(browser_page) as page:
        page.get_by_role("tab", name="Library").click()
        page.locator("#library-refresh").click()
        page.wait_for_function(f"document.querySelector('#library-runs').innerText.includes('{done.run_dir.name}')")
        page.locator("#library-run textarea").fill(done.run_dir.name)
        page.get_by_role("button", name="Show").click()
        page.get_by_text('base_model = "demo"').wait_for(timeout=30_000)
        page.get_by_role("button", name="Export").click()
        link = page.locator("#library-download a").first
        link.wait_for(timeout=30_000)
        with page.expect_download() as download:
            link.click()
        saved = tmp_path / "downloaded.safetensors"
        download.value.save_as(saved)
        assert load_lora(saved).family == "sd1"
        page.screenshot(path=str(SCREENSHOTS / "library-tab.png"), full_page=True)


@pytest.mark.browser
def test_train_tab_runs_shows_progress_and_samples_then_stops_and_resumes(browser_page, tmp_path, monkeypatch):
    from lora_studio.ui import train_tab

    monkeypatch.setattr(train_tab, "_manager", None)
    with app_page(browser_page) as page:
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-steps input").fill("300")
        page.get_by_text("Advanced").click()
        advanced = (f"output_dir='{tmp_path}'\ndataset.cache_dir='{tmp_path / 'cache'}'\n"
                    "sample.every_n_steps=5\nsample.num_inference_steps=2\nsave.every_n_steps=0")  # fmt: skip
        page.locator("#train-advanced .cm-content").fill(advanced)
        page.locator("#train-start").click()
        page.locator("#train-message").get_by_text("started").wait_for(timeout=30_000)
        status = page.locator("#train-status")
        page.wait_for_function("/step [1-9][0-9]*\\/300/.test(document.querySelector('#train-status').innerText)")
        page.locator("#train-samples .thumbnail-item").first.wait_for(timeout=60_000)
        page.locator("#train-loss canvas, #train-loss svg").first.wait_for(timeout=30_000)
        page.wait_for_function("document.querySelector('#train-log textarea').value.includes('prepared')")
        page.screenshot(path=str(SCREENSHOTS / "train-tab.png"), full_page=True)
        page.locator("#train-stop").click()
        status.get_by_text("stopped").wait_for(timeout=60_000)
        page.locator("#train-resume").click()
        page.locator("#train-message").get_by_text("resumes").wait_for(timeout=30_000)
        status.get_by_text("running").wait_for(timeout=60_000)
        page.locator("#train-stop").click()
        status.get_by_text("stopped").wait_for(timeout=60_000)
    runs = [p for p in tmp_path.iterdir() if p.name.startswith("demo-")]
    assert len(runs) == 1 and (runs[0] / "state" / "trainer.safetensors").is_file()

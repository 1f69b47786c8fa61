"""The app: safe defaults, clear messages, and the page itself in headless Chromium."""

import base64
import contextlib
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_studio.errors import LoraStudioError
from lora_studio.ui.app import bundled_models_table, check_base_model, is_loopback, launch, parse_auth

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # screenshots of each tab, git-ignored
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
    with pytest.raises(LoraStudioError, match="without a password.*--auth-file FILE .*LORA_STUDIO_AUTH"):
        launch(host=host, open_browser=False, block=False)


def test_default_bind_is_this_machine_only():
    from lora_studio.cli import build_parser

    args = build_parser().parse_args(["app"])
    assert args.host == "127.0.0.1" and not args.listen and args.port is None
    app = launch(port=free_port(), open_browser=False, block=False)
    try:
        assert app.server_name == "127.0.0.1"
        assert app.local_url.startswith("http://127.0.0.1:")
    finally:
        app.close()


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


def test_check_base_model_gives_a_sentence_not_a_traceback(app_state, lora_file):
    models = app_state.roots.models
    models.mkdir()
    shutil.copy(lora_file, models / lora_file.name)
    message = check_base_model(app_state, str(models / lora_file.name), allow_pickle=False)
    assert message.startswith("**Cannot use this base model.**") and "is a LoRA adapter" in message
    assert "Traceback" not in message
    assert "was not found" in check_base_model(app_state, str(models / "missing.safetensors"), False)
    assert "Enter `demo`" in check_base_model(app_state, "  ", False)
    assert "lies outside the app's folders" in check_base_model(app_state, str(lora_file), False)


def test_check_base_model_reports_the_family(app_state, tiny_folders):
    shutil.copytree(tiny_folders["sdxl"], app_state.roots.models / "sdxl")
    message = check_base_model(app_state, str(app_state.roots.models / "sdxl"), False)
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
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    app = launch(port=port, auth=auth, open_browser=False, block=False)
    try:
        page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=60_000)
        yield page
    finally:
        app.close()


@pytest.mark.browser
def test_page_lists_models_and_checks_a_file(browser_page, lora_file, app_state):
    app_state.roots.models.mkdir()
    lora_file = shutil.copy(lora_file, app_state.roots.models / lora_file.name)
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
        page.screenshot(path=str(ARTIFACTS / "models-check.png"), full_page=True)


@pytest.mark.browser
def test_page_asks_for_login_when_auth_is_set(browser_page, app_state):
    with app_page(browser_page, auth="me:s3cret") as page:
        page.get_by_label("username").fill("me")
        page.get_by_label("password").fill("wrong")
        page.get_by_role("button", name="Login").click()
        page.get_by_text("Incorrect Credentials").wait_for(timeout=15_000)
        assert page.locator("#bundled-models").count() == 0


HAS_TEXT = (
    "([sel, text]) => { const e = document.querySelector(sel); return e && (e.value ?? e.innerText).includes(text) }"
)
# -1 until the bar is drawn: a page that is still loading has none yet (a throw would end the wait at once).
PROGRESS = "Number(document.querySelector('#train-progressbar')?.getAttribute('aria-valuenow') ?? -1)"


def wait_for_text(page, selector: str, text: str, timeout: int = 60_000) -> None:
    page.wait_for_function(HAS_TEXT, arg=[selector, text], timeout=timeout)


def progress_step(page) -> int:
    return int(page.locator("#train-progressbar").get_attribute("aria-valuenow"))


def download_from(page, selector: str, to: Path) -> Path:
    """Click the download link a gr.File shows and save what the browser receives at `to`."""
    link = page.locator(f"{selector} a").first
    link.wait_for(timeout=30_000)
    with page.expect_download() as download:
        link.click()
    download.value.save_as(to)
    return to


def image_bytes(page, selector: str) -> bytes:
    src = page.locator(f"{selector} img").get_attribute("src")
    return base64.b64decode(src.split(",", 1)[1]) if src.startswith("data:") else page.request.get(src).body()


@pytest.mark.browser
def test_the_whole_loop_in_one_browser_session(browser_page, tmp_path, monkeypatch, app_state):
    """Started from another working directory: upload the demo images, edit a caption, train, close and reopen
    the page while it trains, stop and resume, preview at strength 0 and 1, then pick the run in the Library's
    table, download its LoRA and read it back."""
    from lora_studio.lora_read import load_lora
    from lora_studio.paths import DEMO_DATASET_DIR

    elsewhere = tmp_path / "some-other-working-directory"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    home = app_state.roots.runs.parent
    uploads = sorted(str(p) for p in DEMO_DATASET_DIR.iterdir() if p.suffix in (".png", ".txt"))
    with app_page(browser_page) as page:
        # 1. Upload the demo images and captions into a new dataset.
        wait_for_text(page, "#dataset-report", "24 images")  # first start: the demo is already open
        page.locator("#dataset-new-name textarea").fill("my shapes")
        page.locator("#dataset-upload input[type=file]").set_input_files(uploads)
        wait_for_text(page, "#dataset-status", "Added 24 images and 24 captions")
        dataset = home / "datasets" / "my_shapes"
        assert len(list(dataset.glob("*.png"))) == 24
        # 2. Edit a caption and see it saved.
        thumbnails = page.locator("#dataset-gallery .thumbnail-item")
        assert thumbnails.count() == 24
        thumbnails.first.click()
        page.wait_for_function("document.querySelector('#caption-edit textarea').value.startsWith('zkz')")
        page.locator("#caption-edit textarea").fill("zkz, an edited caption")
        page.locator("#caption-save").click()
        first = sorted(dataset.glob("*.txt"))[0]  # the gallery lists the files in name order
        wait_for_text(page, "#dataset-status", f"Saved {first.name}")
        assert first.read_text() == "zkz, an edited caption\n"
        page.screenshot(path=str(ARTIFACTS / "dataset-tab.png"), full_page=True)

        # 3. A short demo training on that dataset, with samples every 5 steps.
        page.get_by_role("tab", name="Train").click()
        wait_for_text(page, "#cfg-dataset-path textarea", str(dataset))  # the open dataset is the one trained
        wait_for_text(page, "#train-estimate", "Steps:")
        page.locator("#cfg-optimizer-max_train_steps input").fill("300")
        page.locator("#train-advanced > button").first.click()
        # The optimizer section opened too: its unset number boxes (unet_lr) are drawn as 0 and must still pass.
        for section in ("general", "dataset", "optimizer", "sample", "save"):
            page.locator(f"#train-section-{section} > button").first.click()
        page.locator("#cfg-sample-every_n_steps input").fill("5")
        page.locator("#cfg-sample-num_inference_steps input").fill("2")
        page.locator("#cfg-save-every_n_steps input").fill("0")
        page.locator("#train-advanced > button").first.click()  # closed again: a compact screenshot
        page.locator("#train-check").click()
        wait_for_text(page, "#train-estimate", "300 in all")
        page.locator("#train-start").click()
        wait_for_text(page, "#train-message", "started")
        # 4. The progress bar and the loss plot update, and samples appear.
        page.wait_for_function(
            "Number(document.querySelector('#train-progressbar').getAttribute('aria-valuenow')) > 0"
        )
        page.locator("#train-samples .thumbnail-item").first.wait_for(timeout=60_000)
        page.locator("#train-loss canvas, #train-loss svg").first.wait_for(timeout=30_000)
        wait_for_text(page, "#train-log textarea", "prepared")
        page.screenshot(path=str(ARTIFACTS / "train-tab.png"), full_page=True)

        # Closing the page does not stop training; a new page shows the same job, still advancing.
        before = progress_step(page)
        url = page.url
        browser = page.context.browser
        page.close()
        page = browser.new_page()
        page.goto(url, wait_until="load", timeout=60_000)
        page.get_by_role("tab", name="Train").click()
        page.wait_for_function(
            f"{PROGRESS} > {before + 3}",
            timeout=60_000,
        )
        wait_for_text(page, "#train-status", "running")

        # 5. Stop, then resume, then stop again.
        page.locator("#train-stop").click()
        wait_for_text(page, "#train-status", "stopped")
        stopped_at = progress_step(page)
        page.locator("#train-resume").click()
        wait_for_text(page, "#train-message", "resumes")
        page.wait_for_function(
            f"{PROGRESS} > {stopped_at}",
            timeout=60_000,
        )
        page.locator("#train-stop").click()
        wait_for_text(page, "#train-status", "stopped")
        runs = [p for p in (home / "runs").iterdir() if p.name.startswith("demo-")]
        assert not list(elsewhere.iterdir())  # nothing was written to the working directory
        assert len(runs) == 1 and (runs[0] / "state" / "trainer.safetensors").is_file()
        lora_file = runs[0] / "demo.safetensors"
        assert lora_file.is_file()

        # 6. Preview: the same seed at strength 0 and 1 gives different images.
        page.get_by_role("tab", name="Preview").click()
        page.locator("#preview-loras input").click()
        page.get_by_role("option", name=f"{runs[0].name}/demo.safetensors").click()
        page.wait_for_function("document.querySelector('#preview-prompt textarea').value.startsWith('zkz')")
        page.locator("#preview-prompt textarea").fill("zkz, a red circle on a white background")

        def render(strength: str) -> bytes:
            page.locator("#preview-strength-0 input[type=number]").fill(strength)
            page.locator("#preview-strength-0 input[type=number]").press("Enter")
            page.locator("#preview-generate").click()
            wait_for_text(page, "#preview-parameters textarea", f":{strength}>")
            return image_bytes(page, "#preview-image")

        at_zero, at_one = render("0"), render("1")
        assert at_zero and at_one and at_zero != at_one
        page.screenshot(path=str(ARTIFACTS / "preview-tab.png"), full_page=True)

        # 7. Library: export the run's LoRA, download it, and read it back.
        page.get_by_role("tab", name="Library").click()
        wait_for_text(page, "#library-runs", runs[0].name)
        page.locator("#library-runs [data-testid^='cell-'][data-col='0']", has_text=runs[0].name).first.click()
        wait_for_text(page, "#library-run", runs[0].name)
        page.get_by_text('base_model = "demo"').wait_for(timeout=30_000)
        page.get_by_role("button", name="Export").click()
        saved = download_from(page, "#library-download", tmp_path / "downloaded.safetensors")
        assert load_lora(saved).family == "sd1"
        page.screenshot(path=str(ARTIFACTS / "library-tab.png"), full_page=True)
        for tab, table, shown in (("Models", "#bundled-models", "sdxl"), ("Presets", "#presets-table", "demo-cpu")):
            page.get_by_role("tab", name=tab).click()  # a screenshot of every tab
            page.locator(table).get_by_text(shown, exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / f"{tab.lower()}-tab.png"), full_page=True)


# 50-90 s; faster, every run: test_dataset_tab's mask painting, test_validation's passes and best file,
# test_preview_tab's best-checkpoint grid and export, test_library_tab's per-image losses
@pytest.mark.slow
@pytest.mark.browser
def test_the_validation_curve_and_the_best_checkpoint_in_the_browser(browser_page, tmp_path, app_state):
    """Issue 18 in the page: train with 3 images held out; the curve has a validation series; the Library and the
    Preview picker mark the best file; the checkpoint x strength grid renders and exports the best checkpoint; a mask
    painted in the Dataset tab is saved beside its image."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    from lora_studio.lora_read import load_lora
    from lora_studio.runs import RunFolder

    with app_page(browser_page) as page:
        wait_for_text(page, "#dataset-report", "24 images")
        page.locator("#dataset-gallery .thumbnail-item").first.click()
        page.locator("#dataset-mask-section > button").first.click()
        canvas = page.locator("#dataset-mask-editor canvas").first
        canvas.wait_for(timeout=30_000)
        page.wait_for_timeout(1000)  # the editor draws the image in before it takes strokes
        for attempt in range(3):
            # Under load the editor may still be drawing the image and drop the stroke ("Nothing is painted"):
            # paint and save again, as a person would.
            box = canvas.bounding_box()
            page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.2)
            page.mouse.down()
            for step in range(1, 11):
                page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * (0.2 + 0.06 * step))
            page.mouse.up()
            page.locator("#dataset-mask-save").click()
            try:
                wait_for_text(page, "#dataset-status", ".mask.png", timeout=20_000 if attempt < 2 else 60_000)
                break
            except PlaywrightTimeout:
                page.wait_for_timeout(1000)
        masks = list((app_state.roots.datasets / "demo").glob("*.mask.png"))
        assert len(masks) == 1 and masks[0].name.startswith("zkz_00")
        import numpy as np
        from PIL import Image

        assert (np.asarray(Image.open(masks[0])) == 0).any()  # the stroke is ignored area now
        page.screenshot(path=str(ARTIFACTS / "dataset-mask.png"), full_page=True)

        page.get_by_role("tab", name="Train").click()
        wait_for_text(page, "#train-estimate", "Steps:")
        page.locator("#cfg-optimizer-max_train_steps input").fill("20")
        page.locator("#train-advanced > button").first.click()
        for section in ("sample", "save", "validation"):
            page.locator(f"#train-section-{section} > button").first.click()
        page.locator("#cfg-sample-every_n_steps input").fill("0")
        page.locator("#cfg-save-every_n_steps input").fill("10")
        page.locator("#cfg-validation-every_n_steps input").fill("5")  # the preset holds out assets/demo-validation
        page.locator("#train-check").click()
        wait_for_text(page, "#train-estimate", "8 images held out for the validation loss")
        page.locator("#train-start").click()
        wait_for_text(page, "#train-status", "done", timeout=120_000)
        # The curve's points carry their series in the SVG: four validation passes (every 5 of 20 steps) beside the
        # training loss.
        page.wait_for_function("document.querySelectorAll(\"#train-loss [aria-label*='series: validation']\")"
                               ".length >= 4", timeout=30_000)  # fmt: skip
        page.screenshot(path=str(ARTIFACTS / "train-tab-validation.png"), full_page=True)
        (run,) = [RunFolder(p) for p in app_state.roots.runs.iterdir() if p.name.startswith("demo-")]
        best = run.best_lora()
        assert [r["step"] for r in run.validation_metrics()] == [5, 10, 15, 20]
        assert best is not None

        page.get_by_role("tab", name="Library").click()
        wait_for_text(page, "#library-runs", "(val ")

        page.get_by_role("tab", name="Preview").click()
        page.locator("#preview-loras input").click()
        page.get_by_role("option", name=f"{run.name}/{best.name} · val").click()  # the picker shows the losses
        # The run's settings land with the trigger word (one event): only then set the grid's own.
        page.wait_for_function("document.querySelector('#preview-prompt textarea').value.startsWith('zkz')")
        page.locator("#preview-grid-kind input").click()
        page.get_by_role("option", name="checkpoint x strength").click()
        page.locator("#preview-steps input").fill("4")  # a quick grid: 3 files x 3 strengths
        page.locator("#preview-grid").click()
        page.locator("#preview-image img").wait_for(timeout=120_000)
        page.wait_for_function("document.querySelector('#preview-pick input').value.includes('(best)')")
        page.screenshot(path=str(ARTIFACTS / "preview-best-checkpoint.png"), full_page=True)
        page.locator("#preview-export").click()
        saved = download_from(page, "#preview-download", tmp_path / "best.safetensors")
        assert set(load_lora(saved).modules) == set(load_lora(best).modules)
        assert (run.exports / f"{best.stem}-kohya-fp16.safetensors").is_file()


def dropdown_options(page, selector: str) -> list[str]:
    """The labels a dropdown offers (opened, read, closed again and left, so that a later click opens it)."""
    field = page.locator(f"{selector} input")
    field.click()
    options = page.get_by_role("option")
    options.first.wait_for(timeout=30_000)
    labels = options.all_inner_texts()
    page.keyboard.press("Escape")
    field.blur()
    return labels


def comes_true(page, condition, timeout_s: float = 30.0) -> bool:
    """Whether `condition()` holds within the time, asked again every 200 ms (the page keeps running meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        page.wait_for_timeout(200)
    return True


def comes_to_offer(page, selector: str, wanted, timeout_s: float = 30.0) -> bool:
    """Whether the dropdown offers a label for which `wanted(label)` holds, reopening it until it does: the list
    follows an event the page answers when the machine gets to it."""
    return comes_true(page, lambda: any(wanted(label) for label in dropdown_options(page, selector)), timeout_s)


@pytest.mark.browser
def test_lists_follow_what_happened_since_the_app_started(browser_page, lora_file, app_state):
    """A run, a preset and a base model that appear while the app runs (a training finished, a preset saved in
    another window, a checkpoint copied in), and an image copied into the open dataset: going to a tab shows them,
    and so does a reloaded page, with no Refresh button clicked."""
    from safetensors.torch import load_file
    from tiny_models import tiny_vae

    from lora_studio.config import load_preset, save_user_preset
    from lora_studio.layout import vae_to_ldm

    home = app_state.roots.runs.parent
    with app_page(browser_page) as page:
        wait_for_text(page, "#dataset-report", "24 images")  # the page has loaded
        run = home / "runs" / "later-20260101-000000"
        run.mkdir(parents=True)
        (home / "models").mkdir()
        base = home / "models" / "later-model.safetensors"
        shutil.copy(lora_file, base)
        (run / "config.toml").write_text(f'name = "later"\nbase_model = "{base}"\n')
        save_file(load_file(lora_file), str(run / "later.safetensors"), metadata={"modelspec.resolution": "768x512"})
        save_user_preset(load_preset("demo-cpu"), "my-later-preset")
        vae = tiny_vae()
        (home / "models" / "VAE").mkdir()
        save_file(vae_to_ldm(vae.state_dict(), vae.config), home / "models" / "VAE" / "later-vae.safetensors")

        page.get_by_role("tab", name="Preview").click()
        page.wait_for_timeout(1000)
        # The new run's LoRA is listed; picked, it brings its run's base model and the size it trained at. A base
        # picked by hand then brings its own size.
        page.locator("#preview-loras input").click()
        page.get_by_role("option", name=f"{run.name}/later.safetensors").click()
        page.wait_for_function("document.querySelector('#preview-width input').value === '768'")
        assert page.locator("#preview-height input").input_value() == "512"
        wait_for_text(page, "#preview-base input", "later-model.safetensors")
        page.keyboard.press("Escape")
        page.locator("#preview-base input").click()
        page.get_by_role("option", name="demo · SD 1.x, epsilon").click()
        page.wait_for_function("document.querySelector('#preview-height input').value === '64'")
        assert page.locator("#preview-width input").input_value() == "64"
        page.get_by_role("tab", name="Library").click()
        wait_for_text(page, "#library-runs", run.name)
        page.get_by_role("tab", name="Presets").click()
        wait_for_text(page, "#presets-table", "my-later-preset")
        # The open dataset as it is on disk now, with the captions the Train form's extension names.
        demo = home / "datasets" / "demo"
        shutil.copy(demo / "zkz_00_red_circle.png", demo / "zkz_99_copied_in.png")
        (demo / "zkz_99_copied_in.caption").write_text("zkz, a caption from a .caption file")
        page.get_by_role("tab", name="Train").click()
        wait_for_text(page, "#train-estimate", "Steps:")  # the tab is drawn and its first events are answered
        page.locator("#train-advanced > button").first.click()
        page.locator("#train-section-dataset > button").first.click()
        extension = page.locator("#cfg-dataset-caption_extension textarea")
        for _ in range(3):  # on a loaded machine a field drawn a moment ago can take its first value after typing
            extension.fill(".caption")
            extension.press("Tab")  # the page holds the new value
            page.wait_for_timeout(1000)
            if extension.input_value() == ".caption":
                break
        page.get_by_role("tab", name="Dataset").click()
        wait_for_text(page, "#dataset-report", "25 images")
        wait_for_text(page, "#dataset-gallery", "zkz, a caption from a .caption file")
        page.locator("#dataset-losses-section > button").first.click()
        assert comes_to_offer(page, "#dataset-loss-run", lambda label: label == run.name)

        page.reload(wait_until="load")
        wait_for_text(page, "#dataset-report", "25 images")  # the demo's copy, with the image copied in
        page.get_by_role("tab", name="Train").click()
        assert comes_to_offer(page, "#train-preset", lambda label: label == "my-later-preset")
        assert not page.locator("#train-recovered").is_visible()  # no job from before a restart: no section
        assert comes_to_offer(page, "#cfg-base_model", lambda label: label.startswith("later-model.safetensors"))
        page.locator("#train-models-folder > button").first.click()
        wait_for_text(page, "#train-models", "later-model.safetensors")
        # The form's VAE is picked from the models folder's VAE files too, and the pick reaches the settings.
        page.locator("#train-advanced > button").first.click()
        page.locator("#train-section-general > button").first.click()
        assert comes_to_offer(page, "#cfg-vae", lambda label: label == "later-vae.safetensors")
        page.locator("#cfg-vae input").click()
        page.get_by_role("option", name="later-vae.safetensors").click()
        page.locator("#train-check").click()
        wait_for_text(page, "#train-estimate", "VAE: later-vae.safetensors, a VAE file")
        # Gradio's run history is off: after all these events the browser keeps none of their inputs.
        assert page.evaluate("() => Object.keys(localStorage).filter(k => k.includes('run-history'))") == []


def typing_sends_nothing(page, selector: str, text: str, replacing: bool = False) -> bool:
    """Whether typing `text` into the field (focused first, and the events its focus set off let pass) sends the
    server no event: each costs the page ~250 ms of CPU whatever its inputs (README, "Typing in the Train form")."""
    sent = []
    field = page.locator(selector)
    field.click()
    field.press("Control+A" if replacing else "Control+End")  # else typed at the end, wherever the click landed
    page.wait_for_timeout(1000)

    def listen(request) -> None:
        if "/queue/join" in request.url:
            sent.append(request.url)

    page.on("request", listen)
    field.press_sequentially(text, delay=50)
    page.wait_for_timeout(1500)
    page.remove_listener("request", listen)
    return not sent


@pytest.mark.browser
def test_typing_in_the_train_form_sends_nothing_until_a_field_is_left(browser_page, app_state, monkeypatch):
    """The estimate follows a typed field when it is left or Enter is pressed, and a pick in a dropdown at once;
    typing a number, a name, a dataset path or a subset line sends nothing at each key."""
    import functools

    from lora_studio.ui import train_tab

    made = []

    @functools.wraps(train_tab.estimate)
    def counted(*args, **kwargs):
        made.append(args[-len(train_tab.KEYS) :])
        return estimate(*args, **kwargs)

    estimate = train_tab.estimate
    monkeypatch.setattr(train_tab, "estimate", counted)  # before the app is built, which binds it
    at = train_tab.KEYS.index
    with app_page(browser_page) as page:
        page.get_by_role("tab", name="Train").click()
        wait_for_text(page, "#train-estimate", "Steps:")
        assert typing_sends_nothing(page, "#cfg-optimizer-max_train_steps input", "123", replacing=True)
        page.keyboard.press("Enter")
        wait_for_text(page, "#train-estimate", "Steps: 123 in all")
        assert made[-1][at("optimizer.max_train_steps")] == 123
        page.locator("#train-advanced > button").first.click()
        page.locator("#train-section-dataset > button").first.click()
        for selector, text in (("#cfg-name textarea", "-typed"), ("#cfg-dataset-path textarea", "-x"),
                               ("#cfg-dataset-subsets textarea", '{ path = "datasets/alice" }')):  # fmt: skip
            assert typing_sends_nothing(page, selector, text), selector
        page.keyboard.press("Tab")  # the subsets field left: the estimate has every typed value
        assert comes_true(page, lambda: made[-1][at("dataset.subsets")] == '{ path = "datasets/alice" }')
        assert made[-1][at("name")] == "demo-typed" and made[-1][at("dataset.path")].endswith("demo-x")
        page.locator("#train-section-sample > button").first.click()
        page.locator("#cfg-sample-sampler input").click()
        page.get_by_role("option", name="ddim", exact=True).click()
        assert comes_true(page, lambda: made[-1][at("sample.sampler")] == "ddim")


@pytest.mark.browser
def test_the_tabs_read_their_lists_outside_gradio_s_queue(browser_page, app_state):
    """A queued event costs the page several loading-status walks of its components for every field the form's
    events have used (README, "Switching tabs"): the reads a tab's select sets off go as plain requests, none through
    the queue, and still bring what changed (a preset saved while the page is open is offered)."""
    from lora_studio.config import load_preset, save_user_preset

    with app_page(browser_page) as page:
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-check").click()
        wait_for_text(page, "#train-estimate", "Steps:")
        save_user_preset(load_preset("demo-cpu"), "made-while-open")
        queued, plain = [], []

        def listen(request) -> None:
            if "/queue/join" in request.url:
                queued.append(request.post_data)
            elif "/gradio_api/run/" in request.url:
                plain.append(request.url)

        page.on("request", listen)
        for tab in ("Library", "Preview", "Presets", "Train"):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_timeout(800)
        page.remove_listener("request", listen)
        assert not queued and len(plain) >= 6, (queued, plain)
        assert comes_to_offer(page, "#train-preset", lambda label: "made-while-open" in label)


def error_badges(page, selector: str):
    """Gradio's visible "Error" badges over the component (each stays until dismissed)."""
    return page.locator(f"{selector} [data-testid='status-tracker']").filter(has_text="Error", visible=True)


def covered(page, selector: str) -> bool:
    """Whether an "Error" badge covers the component now."""
    return error_badges(page, selector).count() > 0


def comes_to_be_covered(page, selector: str) -> bool:
    """Whether an "Error" badge covers the component within a few seconds: the toast can show a frame before the
    badges do (CI once read the report bare right after the toast)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    try:
        error_badges(page, selector).first.wait_for(timeout=10_000)
    except PlaywrightTimeoutError:
        return False
    return True


def refusal(page) -> str:
    """The newest error toast's sentence, once it is shown; the toast is closed again."""
    toast = page.locator("[data-testid='toast-body']").last
    toast.wait_for(timeout=30_000)
    text = toast.inner_text()
    page.locator("[data-testid='toast-close']").last.click()
    return text


@pytest.mark.browser
def test_a_refused_request_leaves_the_work_in_view(browser_page, lora_file, app_state):
    """Gradio covers each output of a failed event with an "Error" badge until dismissed. A refusal (a folder that
    does not exist, a run deleted without the tick, a broken preset file) says why in a toast and leaves the
    gallery, the runs table and the form in view."""
    from lora_studio.paths import user_presets_dir

    home = app_state.roots.runs.parent
    run = home / "runs" / "kept-20260101-000000"
    run.mkdir(parents=True)
    (run / "config.toml").write_text('name = "kept"\n')
    shutil.copy(lora_file, run / "kept.safetensors")
    user_presets_dir().mkdir(parents=True)
    (user_presets_dir() / "broken.toml").write_text("name = [\n")
    with app_page(browser_page) as page:
        wait_for_text(page, "#dataset-report", "24 images")
        page.locator("#dataset-source textarea").fill("no/such/folder")
        page.locator("#dataset-open").click()
        assert "no/such/folder" in refusal(page)
        assert comes_to_be_covered(page, "#dataset-report")  # the badge marks the report, the one message it concerns
        assert not covered(page, "#dataset-gallery") and page.locator("#dataset-gallery .thumbnail-item").count() == 24

        page.get_by_role("tab", name="Library").click()
        wait_for_text(page, "#library-runs", run.name)
        page.locator("#library-runs [data-testid^='cell-'][data-col='0']", has_text=run.name).first.click()
        wait_for_text(page, "#library-run", run.name)
        page.get_by_role("button", name="Delete run").click()
        assert "Tick 'Yes, delete it' first" in refusal(page)
        assert comes_to_be_covered(page, "#library-status") and not covered(page, "#library-runs")
        assert run.name in page.locator("#library-runs").inner_text()
        assert run.is_dir()

        page.get_by_role("tab", name="Train").click()
        page.locator("#train-preset input").click()
        page.get_by_role("option", name="broken").click()
        assert "broken" in refusal(page)
        assert comes_to_be_covered(page, "#train-estimate")
        assert not any(covered(page, f"#cfg-{key}") for key in ("name", "dataset-path", "base_model"))
        assert page.locator("#cfg-dataset-path textarea").input_value().endswith("demo")
        # A refused Start lists each bad setting on a line of its own, the setting's name as code (the notice
        # is HTML, not Markdown: it had shown one run-on line with the backticks).
        page.locator("#cfg-dataset-batch_size input").fill("0")
        page.locator("#cfg-lora-rank input").fill("0")
        page.locator("#train-start").click()
        toast = page.locator("[data-testid='toast-body']").last
        toast.wait_for(timeout=30_000)
        assert toast.locator("code").all_inner_texts() == ["dataset.batch_size", "lora.rank"]
        assert "problem(s):\n" in toast.inner_text() and "`" not in toast.inner_text()


def test_the_app_starts_with_leftover_and_foreign_files_in_place(app_state, tiny_folders):
    """A run killed mid-write (cut-off metrics line), a malformed .safetensors and a diffusers folder with a
    damaged model_index.json: the app starts, lists the run, and lists both models as unusable with why."""
    import httpx

    from lora_studio.ui import library_tab, train_tab

    home = app_state.roots.runs.parent
    run = home / "runs" / "cut-20260101-000000"
    run.mkdir(parents=True)
    (run / "config.toml").write_text('name = "cut"\n')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo')
    models = home / "models"
    models.mkdir()
    header = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}'
    (models / "bad.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    shutil.copytree(tiny_folders["sd1"], models / "broken")
    (models / "broken" / "model_index.json").write_text("{not json")
    port = free_port()
    app = launch(port=port, open_browser=False, block=False)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/config").status_code == 200
        labels = {value.split("/")[-1]: label for label, value in train_tab.base_choices()}
        assert "cannot use" in labels["bad.safetensors"] and "is not a safetensors file" in labels["bad.safetensors"]
        assert "cannot use" in labels["broken"] and "model_index.json cannot be read as JSON" in labels["broken"]
        assert library_tab.runs_table(app.lora_studio) == [[run.name, 1, 0.5, "no", ""]]
    finally:
        app.close()


def test_listening_with_a_password_warns_that_plain_http_is_unencrypted(app_state, caplog):
    import logging

    caplog.set_level(logging.WARNING, logger="lora_studio")
    app = launch(host="0.0.0.0", port=free_port(), auth="me:s3cret", open_browser=False, block=False)
    try:
        assert any("over plain HTTP" in r.getMessage() and "--ssl-certfile" in r.getMessage() for r in caplog.records)
    finally:
        app.close()


def test_the_app_at_rest_leaves_the_cpu_alone(app_state):
    # Gradio's queue, left as it comes, wakes every 1 ms when it has nothing to do: its thread took 1.54 s of CPU in
    # 20 s here (7.7% of a core), 0.13 s with calm_queue's intervals. Measured as the CPU time of this process's
    # other threads (the test's own thread only sleeps) while the app serves nobody.
    import psutil

    port = free_port()
    app = launch(port=port, open_browser=False, block=False)
    try:
        time.sleep(1)
        this = psutil.Process()
        before = {t.id: t.user_time + t.system_time for t in this.threads()}
        time.sleep(4)
        after = {t.id: t.user_time + t.system_time for t in this.threads()}
        used = sum(cpu - before.get(tid, 0.0) for tid, cpu in after.items())
    finally:
        app.close()
    assert used < 0.16, f"{used:.2f} s of CPU in 4 s with nothing to do (Gradio's queue polling?)"

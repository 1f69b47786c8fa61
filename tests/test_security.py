"""Attacks on a running app over real HTTP, as a web page or a local process could make them.

The app runs on a loopback port with its home in a temp folder. Beside the home lies a folder the app
must never touch, with a sentinel file, an image, a caption and a LoRA as bait; after every test each
of its files is byte-identical. Requests go through Gradio's own queue protocol (tests/gradio_http.py)
with payloads, Host and Origin headers and event data of the test's choosing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from gradio_http import GradioHTTP
from PIL import Image
from safetensors.torch import save_file
from test_app import free_port

from lora_studio.runs import RunFolder
from lora_studio.ui.config_form import KEYS

BAIT = {"sentinel.txt": b"do not touch\n", "caption.txt": b"a secret caption\n"}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    home, outside, uploads = root / "home", root / "outside", root / "gradio"
    for folder in (home, outside, uploads):
        folder.mkdir()
    for name, data in BAIT.items():
        (outside / name).write_bytes(data)
    Image.new("RGB", (64, 64), "red").save(outside / "image.png")
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2), "lora_unet_x.lora_up.weight": torch.ones(2, 2)},
              str(outside / "lora.safetensors"))  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LORA_STUDIO_HOME", str(home))
        env.setenv("GRADIO_TEMP_DIR", str(uploads))
        env.delenv("LORA_STUDIO_MODELS", raising=False)
        from lora_studio.ui.app import launch

        port = free_port()
        app = launch(port=port, open_browser=False, block=False, max_upload_mb=1)
        try:
            yield {"url": f"http://127.0.0.1:{port}", "port": port, "home": home, "outside": outside,
                   "before": snapshot(outside), "app": app}  # fmt: skip
        finally:
            app.close()


@pytest.fixture(autouse=True)
def outside_untouched(server):
    yield
    assert snapshot(server["outside"]) == server["before"], "a file outside the app's folders changed"
    assert {p.name for p in server["outside"].iterdir()} == set(server["before"]), "a file appeared outside"


@pytest.fixture
def client(server):
    return GradioHTTP(server["url"])


def assert_refused(result, *phrases: str) -> str:
    """The sentence of a refusal, as the page's notice gets it (HTML: `code` as <code>), holding each phrase."""
    from lora_studio.ui.errors import notice_html

    ok, message = result
    assert not ok, f"expected a refusal, got {message!r}"
    for phrase in phrases:
        assert notice_html(phrase) in message, message
    assert "Traceback" not in message
    return message


def test_foreign_host_headers_are_refused(server):
    port = server["port"]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", f"localhost.evil:{port}",
                 f"127.0.0.1:{port + 1}"):  # fmt: skip
        for method, path in (("GET", "/"), ("GET", "/config"), ("GET", "/gradio_api/info"),
                             ("POST", "/gradio_api/queue/join")):  # fmt: skip
            response = httpx.request(method, server["url"] + path, headers={"Host": host}, json={})
            assert response.status_code == 403, (host, path, response.status_code)
            assert "answers only to 127.0.0.1" in response.text
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert httpx.get(server["url"] + "/config", headers={"Host": host}).status_code == 200, host


def test_the_train_tabs_poll_outside_the_queue_hears_no_state_and_no_foreign_host(server, client):
    """The live view's poll skips Gradio's queue (train_tab.poll_every_second); its only input is the page's
    server-side `Shown`, so a value a request puts there is not heard, and the Host check covers its route."""
    api_name = next(d["api_name"] for d in client.config()["dependencies"] if d.get("api_name") == "poll")
    bait = [str(server["outside"] / "sentinel.txt"), {"job": 99, "every": 0.001, "log": "x"}, "../../outside"]
    for number, forged in enumerate(bait):
        # What a page that sent nothing is shown (idle, or a job other tests of this app left stopped)
        honest = client.call_direct(api_name, [None], session=f"honest-{number}").json()["data"][:2]
        response = client.call_direct(api_name, [forged], session=f"page-{number}")
        assert response.status_code == 200, response.text
        bar, line, *_rest = response.json()["data"]
        assert [bar, line] == honest  # as if sent None: the forged job 99 and its log are not heard
    # The same page again: the server remembers what it sent (nothing new to send), whatever the request claims.
    again = client.call_direct(api_name, [{"bar": "", "line": ""}], session="page-0").json()["data"]
    # gr.skip() for the bar and the status line: an update with no value, so the page keeps what it shows
    assert all(o["__type__"] == "update" and "value" not in o and "value" not in o.get("props", {}) for o in again[:2])
    foreign = client.call_direct(api_name, [None], headers={"Host": f"evil.example:{server['port']}"})
    assert foreign.status_code == 403 and "answers only to 127.0.0.1" in foreign.text


def test_gradio_s_run_history_and_its_bucket_upload_are_off(server, client):
    """Gradio's run history would keep every event's inputs in the browser and offer to copy them to a Hugging Face
    bucket: off, its page and routes gone, and the page's config says so (its frontend then records nothing)."""
    assert client.config().get("run_history") is False
    routes = [("GET", "/gradio_api/runs"), ("GET", "/gradio_api/run-history/buckets"),
              ("GET", "/gradio_api/run-history/records"), ("POST", "/gradio_api/run-history/connect")]  # fmt: skip
    for method, path in routes:
        response = httpx.request(method, server["url"] + path, json={"bucket_id": "someone/bucket"})
        assert response.status_code == 404, (path, response.status_code)


def test_cross_origin_requests_that_change_something_are_refused(server, tmp_path):
    picture = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(picture)
    for origin in ("http://evil.example", "null", f"http://localhost:{server['port'] + 1}"):
        response = GradioHTTP(server["url"]).upload(picture, headers={"Origin": origin})
        assert response.status_code == 403, origin
        assert "may not change anything" in response.text
    ours = GradioHTTP(server["url"]).upload(picture, headers={"Origin": server["url"]})
    assert ours.status_code == 200


def test_request_bodies_are_capped_before_the_app_reads_them(server, client, tmp_path):
    """Gradio reads a JSON body whole into memory: a body over the cap, or one streamed without a declared length,
    is refused before the app reads it; uploads keep their own route and per-file cap."""
    from lora_studio.ui.guard import MAX_REQUEST_BYTES

    join = server["url"] + "/gradio_api/queue/join"
    over = b'{"data": ["' + b"x" * MAX_REQUEST_BYTES + b'"]}'
    response = httpx.post(join, content=over, headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413 and f"at most {MAX_REQUEST_BYTES // 2**20} MB" in response.text

    def streamed():
        yield b'{"data": ["'
        yield b"x" * 1024
        yield b'"]}'

    response = httpx.post(join, content=streamed(), headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 411 and "must declare its length" in response.text
    # A page's requests (a gallery of 24 demo images with captions) and uploads still pass.
    # (its own session: state kept apart)
    ok, data = client.call("open_dataset", ["demo", None, ".txt", None], session="a-page-of-its-own")
    assert ok and "24 images" in data[3]
    picture = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(picture)
    assert client.upload(picture).status_code == 200


def test_every_handler_answers_empty_or_mistyped_values_with_a_sentence(server, client):
    """Every event of the page, sent nothing (None) or a number for each of its inputs, as a request may: each
    answers, or refuses with a sentence; none fails as "an unexpected error" (our crash, its traceback in the log)."""
    names = sorted({d["api_name"] for d in client.config()["dependencies"] if d.get("api_name")} - {"poll"})
    assert len(names) > 40
    crashed = {}
    for value in (None, 12345):
        for name in names:
            _index, dependency = client.dependency(name)
            ok, said = client.call(name, [value] * len(dependency["inputs"]), session=f"odd-{name}")
            if not ok and ("unexpected error" in str(said) or "Traceback" in str(said)):
                crashed[f"{name}({value})"] = said
    assert not crashed, crashed


def test_dataset_folders_outside_the_roots_are_refused(server, client):
    home, outside = server["home"], server["outside"]
    link = home / "datasets" / "innocent"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(outside)
    for source in (str(outside), "../outside", "%2e%2e/outside", "datasets/../../outside", str(link), "innocent",
                   "/etc", str(home / "datasets" / ".." / ".." / "outside")):  # fmt: skip
        assert_refused(client.call("open_dataset", [source, None, ".txt", None]), "outside the app's folders")
    # The open folder is server-side state: a request that puts a folder in the state's place is not heard (a page
    # that opened none, whatever other tests' pages opened).
    bait, fresh = str(outside), "a-page-that-opened-nothing"
    assert_refused(client.call("apply_bulk_edit", [bait, "zkz", "", "", "secret", "x", None, ".txt", None],
                               session=fresh), "No dataset is open")  # fmt: skip
    caption = client.call("save_caption", [bait, str(outside / "image.png"), "a new caption", ".txt", None],
                          session=fresh)  # fmt: skip
    assert_refused(caption, "No dataset is open")


def test_uploads_stay_inside_the_datasets_folder(server, client, tmp_path):
    picture = tmp_path / "..%2f..%2foutside%2fsentinel.png"
    Image.new("RGB", (8, 8), "blue").save(picture)
    (stored,) = client.upload(picture).json()
    ok, data = client.call("upload", [str(server["outside"]), "../../outside",
                                      [GradioHTTP.file_data(stored, picture.name)], None, ".txt", None])  # fmt: skip
    assert ok, data
    landed = server["home"] / "datasets" / "outside"
    assert landed.is_dir() and len(list(landed.glob("*.png"))) == 1
    # A file path of the server's choosing is not an upload, whatever the request claims.
    result = client.call("upload", [None, "x", [GradioHTTP.file_data(str(server["outside"] / "sentinel.txt"))], None,
                                    ".txt", None])  # fmt: skip
    assert_refused(result)


def test_an_imported_config_comes_only_from_an_upload_and_reads_nothing_it_names(server, client, tmp_path):
    """The Train tab's import over HTTP: an uploaded kohya_ss save fills the form; a server path claimed as the
    upload, and a save naming a dataset config outside the roots, are refused (nothing read, nothing written)."""
    save = tmp_path / "kohya_ss.json"
    save.write_text(json.dumps({"LoRA_type": "Standard", "network_dim": "12", "optimizer": "AdamW",
                                "train_data_dir": str(server["outside"]), "xformers": "xformers"}))  # fmt: skip
    (stored,) = client.upload(save).json()
    ok, data = client.call("import_settings", [GradioHTTP.file_data(stored, save.name)])
    assert ok, data
    values = dict(zip(KEYS, data[:-2], strict=True))
    assert values["lora.rank"] == 12 and values["dataset.path"] == str(server["outside"])  # Start refuses it
    assert_refused(client.call("start", data[:-2]), "dataset folder", "lies outside")
    # (Gradio itself refuses a file it did not receive; the handler would too: test_kohya_configs)
    assert_refused(client.call("import_settings", [GradioHTTP.file_data(str(server["outside"] / "sentinel.txt"))]))
    (tmp_path / "sets.toml").write_text("[general]\n")  # outside the roots
    save.write_text(json.dumps({"network_dim": 4, "dataset_config": str(tmp_path / "sets.toml")}))
    (stored,) = client.upload(save).json()
    ok, data = client.call("import_settings", [GradioHTTP.file_data(stored, save.name)])
    assert ok and "which an import cannot bring along" in data[-2]


def test_over_cap_uploads_and_captions_are_refused(server, client, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (2 * 1024 * 1024))  # the app was started with --max-upload-mb 1
    assert client.upload(big).status_code == 413
    caption = tmp_path / "huge.txt"
    caption.write_text("tag, " * 20000)
    image = tmp_path / "huge.png"
    Image.new("RGB", (8, 8)).save(image)
    stored = [client.upload(p).json()[0] for p in (image, caption)]
    ok, data = client.call("upload", [None, "capped", [GradioHTTP.file_data(s) for s in stored], None, ".txt", None])
    assert ok and "huge.txt: over the 64 KB a caption may have" in data[-2]


def test_the_caption_extension_from_the_form_cannot_name_another_file(server, client, tmp_path):
    """The Dataset tab reads and writes the caption files the Train form's `dataset.caption_extension` names: a path
    sent in its place is refused as that setting by every handler that takes it, before any file is read or
    written (an upload makes no folder)."""
    ok, data = client.call("open_dataset", ["demo", None, ".txt", None])
    assert ok
    image = Path(data[2][0]["image"]["path"]).name  # the first picture of the demo dataset's gallery
    picture = tmp_path / "new.png"
    Image.new("RGB", (8, 8), "green").save(picture)
    (stored,) = client.upload(picture).json()
    for bad in ("/../../../outside/sentinel", ".txt/../../../outside/caption", "."):
        for handler, values in (("open_dataset", ["demo", None, bad, None]),
                                ("upload", [None, "by-extension", [GradioHTTP.file_data(stored)], None, bad, None]),
                                ("save_caption", [None, image, "overwritten", bad, None]),
                                ("apply_bulk_edit", [None, "zkz", "", "", "", "", None, bad, None]),
                                ("preview_captions", [None, None, "overwrite", "", 0.35, bad, None]),
                                ("caption_all", [None, None, "overwrite", "", 0.35, 4, None, bad, None]),
                                ("current_view", [str(server["outside"]), None, bad, None])):  # fmt: skip
            assert_refused(client.call(handler, values), "`dataset.caption_extension`", "is not a file extension")
    assert not (server["home"] / "datasets" / "by-extension").exists()
    # The Dataset tab's re-read on select takes the open folder from the page's server-side state, never the request.
    ok, data = client.call("current_view", [str(server["outside"]), None, ".txt", None], session="never-opened")
    assert ok and all(update == {"__type__": "update"} for update in data)  # nothing open: nothing read or sent


def test_the_forms_subsets_cannot_lead_the_dataset_tab_out_of_its_folder(server, client):
    """The Dataset tab reads the Train form's subsets (which of them the open folder is, and that subset's caption
    extension); a request's subsets naming a folder outside the roots, or an extension that is a path, change
    nothing: the open folder stays the server's, captions keep the form's .txt, nothing outside is read or written
    (the autouse check), and the picker of the form's folders only echoes text."""
    outside, page = server["outside"], "a-page-with-subsets"  # its own open folder: other tests' pages keep theirs
    folder = server["home"] / "datasets" / "with-subsets"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), "blue").save(folder / "a.png")
    caption = folder / "a.txt"
    caption.write_text("zkz, a blue square\n")
    ok, data = client.call("open_dataset", [str(folder), None, ".txt", None], session=page)
    assert ok, data
    hostile = (f'{{ path = "{outside}", caption_extension = ".caption" }}',
               '{ path = "datasets/demo", caption_extension = "/../../../outside/sentinel" }',
               '{ path = "../../outside", caption_extension = ".txt" }', "not a table")  # fmt: skip
    for number, subsets in enumerate(hostile):
        ok, data = client.call("apply_bulk_edit", [str(outside), "", "", f", edit{number}", "", "", None, ".txt",
                                                   subsets], session=page)  # fmt: skip
        assert ok, data
        assert caption.read_text().strip().endswith(f", edit{number}")  # the open folder's .txt captions
        assert not list(folder.glob("*.caption"))
        ok, data = client.call("current_view", [str(outside), None, ".txt", subsets], session=page)
        assert ok and "a secret caption" not in str(data) and "with-subsets" in str(data)
    ok, data = client.call("form_folders", [str(outside / "sentinel.txt"), f'{{ path = "{outside}" }}'])
    assert ok and [choice[1] for choice in data[0]["choices"]] == [str(outside / "sentinel.txt"), str(outside)]


def test_a_caption_linked_out_of_the_folder_is_never_shown(server, client):
    # A folder and a page of its own: the demo copy and the other tests' pages stay as they are, in any order.
    folder = server["home"] / "datasets" / "linked"
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), "blue").save(folder / "a.png")
    if not (folder / "a.txt").is_symlink():
        (folder / "a.txt").symlink_to(server["outside"] / "caption.txt")
    ok, data = client.call("open_dataset", [str(folder), None, ".txt", None], session="a-page-of-links")
    assert ok
    gallery, report = data[2], data[3]
    assert "a secret caption" not in str(gallery) and "is a link to a file outside the dataset folder" in report


def form_values(client, **changes) -> list:
    ok, values = client.call("preset_values", ["demo-cpu", "demo"])
    assert ok, values
    values = dict(zip(KEYS, values, strict=True))
    values.update({key.replace("__", "."): value for key, value in changes.items()})
    return list(values.values())


def test_training_paths_outside_the_runs_folder_are_refused(server, client):
    outside = str(server["outside"])
    for changes, phrase in (
        ({"output_dir": outside}, "`output_dir`"),
        ({"output_dir": "../outside"}, "`output_dir`"),
        ({"dataset__cache_dir": outside}, "`dataset.cache_dir`"),
        ({"dataset__path": outside}, "dataset folder"),
        ({"base_model": str(server["outside"] / "lora.safetensors")}, "base model"),
        ({"regularization__path": outside}, "`regularization.path`"),
        ({"regularization__path": "../outside"}, "`regularization.path`"),
        ({"lora__network_weights": str(server["outside"] / "lora.safetensors")}, "`lora.network_weights`"),
        ({"vae": str(server["outside"] / "lora.safetensors")}, "`vae`"),
        ({"vae": "../outside"}, "`vae`"),
        ({"dataset__subsets": f'{{ path = "{outside}", repeats = 2 }}'}, "line 1 of `dataset.subsets`"),
        ({"dataset__subsets": '{ path = "../outside", regularization = true }'}, "line 1 of `dataset.subsets`"),
    ):
        assert_refused(client.call("start", form_values(client, **changes)), phrase, "lies outside")
    assert_refused(client.call("preset_values", ["../../outside/x", ""]))  # Gradio's own check of the choices
    # Check settings reads a VAE's header only inside the roots: outside, it says so and reads nothing there.
    ok, shown = client.call("estimate", form_values(client, vae=str(server["outside"] / "lora.safetensors")))
    assert ok and "lies outside" in shown[0] and "**VAE:**" not in shown[0] and "no VAE weights" not in shown[0]


def test_training_sizes_and_sampling_are_capped(server, client):
    """A bucket side of 10^12 once kept "Check settings" listing buckets for hours; now every size is a bounded
    setting, refused at once with its field's name, and so is a sampling that would render hundreds of images."""
    for changes, phrase in (
        ({"dataset__max_bucket_reso": 10**12, "dataset__enable_bucket": True}, "`dataset.max_bucket_reso`"),
        ({"dataset__resolution": 10**9}, "`dataset.resolution`"),
        ({"sample__width": 10**6}, "`sample.width`"),
        ({"sample__seeds": "[" + ", ".join(map(str, range(100))) + "]", "sample__strengths": "[0.5, 1.0]"},
         "200 images at each sampling"),
    ):  # fmt: skip
        start = time.monotonic()
        ok, shown = client.call("estimate", form_values(client, **changes))
        assert ok and phrase in shown[0], shown
        assert time.monotonic() - start < 10
        assert_refused(client.call("start", form_values(client, **changes)), phrase)


def test_a_preset_name_cannot_leave_the_presets_folder(server):
    from lora_studio.config import load_preset
    from lora_studio.errors import ConfigError

    (server["home"] / "evil.toml").write_text('name = "x"\n')
    with pytest.raises(ConfigError, match="there is no"):
        load_preset(str(Path("..") / ".." / server["home"] / "evil"))


def test_preview_library_and_model_checks_read_nothing_outside(server, client):
    outside = server["outside"]
    common = ["zkz", "", "euler_a", 2, 5.0, 1, 1, 64, 64, 1.0, 1.0, 1.0, 1.0]
    # The LoRA list takes only its own choices (Gradio refuses others); the base model box takes any text.
    assert_refused(client.call("generate", ["demo", "", [str(outside / "lora.safetensors")], *common]))
    assert_refused(client.call("generate", [str(outside), "", [], *common]), "lies outside")
    # The VAE box takes any text too: a file outside, a climb out, a value that is not text; none is read.
    for vae in (str(outside / "lora.safetensors"), "../outside/sentinel.txt", {"path": str(outside)}):
        assert_refused(client.call("generate", ["demo", vae, [], *common]))
    assert_refused(client.call("generate", ["demo", str(outside / "sentinel.txt"), [], *common]), "`vae`")
    assert_refused(client.call("lora_picked", [[str(outside / "lora.safetensors")], None]))
    assert_refused(client.call("base_size", [str(outside)]), "lies outside")  # reads no config.json there
    assert "lies outside" in client.call("check_base_model", [str(outside / "lora.safetensors"), False])[1][0]
    row = {"index": [0, 0], "value": "../outside", "row_value": ["../outside", 0, None, "no"], "selected": True}
    selected = client.call("select_run", [{"headers": ["run"], "data": [["../outside"]]}], event_data=row)
    assert_refused(selected, "No run")
    run_name = "../outside"  # in the chosen run's (server-side) place: not heard
    lora = str(outside / "lora.safetensors")
    assert_refused(client.call("export_file", [run_name, lora, "kohya", "fp16"]))  # and checked_file below it
    assert_refused(client.call("delete_run", [run_name, True]), "No run is selected")  # the page's state: none


def test_preview_size_and_grid_cells_are_capped(server, client):
    common = ["zkz", "", "euler_a", 2, 5.0, 1]
    too_big = ["demo", "", [], *common, 1, 100000, 100000, 1, 1, 1, 1]
    assert_refused(client.call("generate", too_big), "greater than maximum value 2048")  # and sample.MAX_SIDE below it
    run = server["home"] / "runs" / "grid-20260101-000000"
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text('name = "grid"\n')
    (run / "grid.safetensors").write_bytes((server["outside"] / "lora.safetensors").read_bytes())
    assert client.call("refresh_lists", [])[0]  # as the page's Refresh button: the new run's file is a choice
    strengths = ", ".join(str(i / 10000) for i in range(10000))
    grid = ["demo", "", [str(run / "grid.safetensors")], "strength x seed", strengths, "1", *common, 64, 64, 1, 1, 1,
            1]  # fmt: skip
    assert_refused(client.call("generate_grid", grid), "10000 x 1 = 10000 images is over the 64 a grid may have")
    outside_vae = ["demo", str(server["outside"] / "lora.safetensors"), [str(run / "grid.safetensors")],
                   "strength x seed", "0, 1", "1", *common, 64, 64, 1, 1, 1, 1]  # fmt: skip
    assert_refused(client.call("generate_grid", outside_vae), "`vae`", "lies outside")


def test_a_training_run_cannot_be_deleted_or_resumed_twice(server, client):
    """Start a long demo run from the page, then try what must be refused while it trains: deleting it from
    the Library, and resuming it from the command line (a second trainer on the same run)."""
    values = form_values(client, optimizer__max_train_steps=5000, sample__every_n_steps=0, save__every_n_steps=0)
    ok, message = client.call("start", values)
    assert ok and "started" in message[0]
    runs = server["home"] / "runs"
    deadline = time.monotonic() + 120
    run = None
    while time.monotonic() < deadline:
        found = [p for p in runs.glob("demo-*") if (p / "metrics.jsonl").is_file()]
        if found:
            run = found[0]
            break
        time.sleep(0.2)
    assert run is not None, "the run did not start"
    try:
        row = {"index": [0, 0], "value": run.name, "row_value": [run.name, 0, None, "training"], "selected": True}
        ok, _ = client.call("select_run", [{"headers": ["run"], "data": [[run.name]]}], event_data=row, session="lib")
        assert ok
        deleting = client.call("delete_run", [None, True], session="lib")
        assert_refused(deleting, "is being trained right now", "will not delete")
        assert run.is_dir()
        env = {**os.environ, "LORA_STUDIO_HOME": str(server["home"])}
        second = subprocess.run([sys.executable, "-m", "lora_studio.cli", "train", "--resume", str(run)],
                                capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
        assert second.returncode == 1 and "is being trained right now" in second.stderr, second.stderr
    finally:
        assert client.call("stop", [])[0]
        server["app"].lora_studio.jobs.wait(1, timeout=120)
    steps = [row["step"] for row in RunFolder(run).read_metrics() if "loss" in row]  # validation lines left out
    assert steps == sorted(set(steps)), "two trainers interleaved the run's metrics"


def test_failed_logins_are_answered_ever_more_slowly(tmp_path, monkeypatch):
    """With a password (as --listen requires): wrong guesses wait longer each time, one at a time, whatever the
    number sent at once; the right password still gets in and resets the wait."""
    monkeypatch.setenv("LORA_STUDIO_HOME", str(tmp_path))
    from lora_studio.ui.app import launch

    port = free_port()
    app = launch(port=port, auth="me:s3cret", open_browser=False, block=False)
    url = f"http://127.0.0.1:{port}/login"
    try:
        times = []
        for _ in range(4):
            started = time.monotonic()
            response = httpx.post(url, data={"username": "me", "password": "guess"})
            times.append(time.monotonic() - started)
            assert response.status_code == 400
        assert times[-1] >= 0.95 and times[-1] - times[0] >= 0.7, times  # 0, 0.25, 0.5, 1 s of backoff (then 2)
        ok = httpx.post(url, data={"username": "me", "password": "s3cret"}, timeout=30)
        assert ok.status_code == 200 and ok.json() == {"success": True}
        quick = time.monotonic()
        assert httpx.post(url, data={"username": "me", "password": "guess"}).status_code == 400
        assert time.monotonic() - quick < 1.0  # the success reset the wait
    finally:
        app.close()


def test_login_attempts_sent_at_once_still_wait_their_turn():
    import asyncio

    from lora_studio.ui.guard import LoginThrottle

    throttle = LoginThrottle("me", "s3cret", base_delay=0.05)

    async def four_at_once():
        started = time.monotonic()
        results = await asyncio.gather(*(throttle.check("me", "guess") for _ in range(4)))
        return results, time.monotonic() - started

    results, took = asyncio.run(four_at_once())
    assert results == [False] * 4 and took >= 0.05 + 0.1 + 0.2
    assert throttle.delay() == 0.4


def test_the_other_path_taking_handlers_read_nothing_outside(server, client):
    """Check settings, the base-model note, resume, an uploaded LoRA, the Library's inspect, resize and merge, and
    the Train form's pickers: each refuses (or reports, or only echoes) a path outside the roots without reading it."""
    outside = server["outside"]
    ok, shown = client.call("estimate", form_values(client, dataset__path=str(outside)))
    assert ok and "lies outside" in shown[0] and "Steps:" not in shown[0]
    ok, note = client.call("base_info", [str(outside / "lora.safetensors")])
    assert ok and note[0].startswith("cannot use:") and "lies outside" in note[0]
    assert_refused(client.call("resume", form_values(client, output_dir=str(outside))))
    crafted = GradioHTTP.file_data(str(outside / "lora.safetensors"))
    assert_refused(client.call("upload_lora", [crafted, []]))
    lora = str(outside / "lora.safetensors")
    for handler, extra in (("inspect_file", []), ("resize_file", [2]), ("merge_file", [1.0])):
        assert_refused(client.call(handler, ["../outside", lora, *extra]))
    # The Train form's pickers, read again with a path from outside in each: the values come back as sent (the
    # page's own text), the lists hold only the models folder's files, and nothing outside is read.
    ok, (base, vae, _table, _note) = client.call("refresh_models", [lora, lora])
    assert ok and base["value"] == lora and vae["value"] == lora
    assert not any(str(outside) in str(choice) for choice in base["choices"] + vae["choices"])


def test_issue_18_handlers_read_and_write_nothing_outside(server, client):
    """The validation folder, the per-image losses of a run, the best-checkpoint export and the mask painter: each
    refuses a path outside the roots, and the image a mask is painted on is server-side state, not a request value."""
    outside = server["outside"]
    ok, shown = client.call("estimate", form_values(client, validation__path=str(outside)))
    assert ok and "lies outside" in shown[0]
    assert_refused(client.call("start", form_values(client, validation__path="../outside")), "outside")
    assert_refused(client.call("image_losses", ["../outside"]))  # not one of the choices; the run is checked below too
    lora = str(outside / "lora.safetensors")
    assert_refused(client.call("export_checkpoint", [lora]))
    assert_refused(client.call("grid_checkpoints", [[lora], "checkpoint x strength"]))
    for handler, extra in (("show_mask", []), ("remove_mask", []), ("save_mask", [None])):
        # The open folder and the selected image are the page's server-side state: bait in their place is not heard.
        # Whether an earlier test left a dataset open in this session or not, the refusal names neither bait path.
        result = client.call(handler, [str(outside), str(outside / "image.png"), *extra])
        message = assert_refused(result)
        assert str(outside) not in message and "image.png" not in message, message
        assert any(reason in message for reason in ("No dataset is open", "Select an image", "'' is not an image"))


def test_a_saved_preset_stays_in_the_user_presets_folder_and_leaves_the_bundled_ones(server, client):
    """Save as preset takes its name from the request: one that climbs out, or a bundled preset's, is refused;
    Delete takes only a listed preset of the person's."""
    from lora_studio.paths import PRESETS_DIR

    bundled = snapshot(PRESETS_DIR)
    for name in ("../../outside/evil", "../outside/sentinel", "/tmp/evil", "demo-cpu", "..", "a\\b"):
        assert_refused(client.call("save_preset", [name, "demo-cpu", *form_values(client)]), "preset name")
    assert_refused(client.call("delete_preset", ["../../outside/sentinel"]))  # not one of the picker's choices
    assert_refused(client.call("delete_preset", ["demo-cpu"]), "not one of your presets")
    assert_refused(client.call("save_preset", ["mine", "../outside", *form_values(client)]))  # not a choice
    ok, (picker, message) = client.call("save_preset", ["mine", "demo-cpu", *form_values(client)])
    assert ok and "Saved your preset" in message and (server["home"] / "user-presets" / "mine.toml").is_file()
    ok, _ = client.call("delete_preset", ["mine"])
    assert ok and not (server["home"] / "user-presets" / "mine.toml").exists()
    assert snapshot(PRESETS_DIR) == bundled


def test_baking_a_stack_reads_only_run_files_and_saves_only_into_uploads(server, client):
    """Bake takes its LoRAs from the picker's choices; Save takes the baked LoRA from the page's server-side state
    (a value sent in its place is not heard) and a name that cannot climb out of runs/uploads."""
    common = ["zkz", "", "euler_a", 2, 5.0, 1, 1, 64, 64, 0, 1.0, 1.0, 1.0, 1.0]
    assert_refused(client.call("bake_stack_preview", ["demo", "", [str(server["outside"] / "lora.safetensors")],
                                                      *common]))  # fmt: skip
    run = server["home"] / "runs" / "bake-20260101-000000"  # a run of this test's own: any order of tests
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.toml").write_text('name = "bake"\n')
    (run / "bake.safetensors").write_bytes((server["outside"] / "lora.safetensors").read_bytes())
    assert client.call("refresh_lists", [])[0]
    bake = client.call("bake_stack_preview", ["demo", "../outside", [str(run / "bake.safetensors")], *common])
    assert_refused(bake, "`vae`", "lies outside")
    bait = {"modules": {}, "path": str(server["outside"] / "sentinel.txt")}
    assert_refused(client.call("save_baked", [bait, "../../outside/sentinel"]), "Bake the stack first")
    assert not (server["home"] / "outside").exists()


def test_the_captioner_is_taken_only_from_the_captioners_folder(server, client):
    """The captioner is a name from the picker (a folder of models/captioners), the dataset the page's open folder:
    a path in either place is not heard, and nothing outside is read or written."""
    outside = str(server["outside"])
    for handler, extra in (("preview_captions", [".txt"]), ("caption_all", [4, "demo-cpu", ".txt"])):
        assert_refused(client.call(handler, [outside, outside, "overwrite", "", 0.35, *extra]))
        assert_refused(client.call(handler, [outside, "../../outside", "overwrite", "", 0.35, *extra]))


def test_regularization_rendering_and_jobs_from_before_a_restart_take_no_path_or_key_from_outside(server, client):
    """Rendering regularization images confines the form's paths like Start; a job from before a restart is named
    by a key from the picker's choices, and a made-up one (a path, say) is refused without touching any file."""
    outside = str(server["outside"])
    assert_refused(client.call("render_regularization", form_values(client, output_dir=outside)), "`output_dir`")
    assert_refused(client.call("render_regularization", form_values(client, dataset__cache_dir=outside)))
    for handler in ("start_recovered", "discard_recovered"):
        assert_refused(client.call(handler, ["../../outside/sentinel"]))
        assert_refused(client.call(handler, [None]), "No job from before the restart is picked")

"""The Train form reaches its handlers as one JSON value the page gathers (config_form.form_json, train_tab.page_form):
it is the form the page shows, and no event takes the form's ~150 fields as inputs (Gradio's page would then update
the loading status of each of them on every later event, the polls included)."""

import json
import time

import pytest
from playwright.sync_api import expect
from test_app import app_page, browser_page  # noqa: F401 (a fixture)

from lora_studio.config import load_preset
from lora_studio.errors import ConfigError
from lora_studio.ui import train_tab
from lora_studio.ui.app import build_app
from lora_studio.ui.config_form import KEYS, config_from_form, form_from_json, form_json, form_values

MOST_INPUTS = 20  # the Preview tab's generate takes 16 settings; the form's events take 1


def test_the_form_s_json_round_trips_and_anything_else_is_refused_with_a_sentence():
    values = form_values(load_preset("sd15-style"))
    assert form_from_json(form_json(values)) == values
    assert config_from_form(form_from_json(form_json(values))) == load_preset("sd15-style")
    sent = json.loads(form_json(values))
    for bad, phrase in (
        (None, "not as the page sends them"),
        (12345, "not as the page sends them"),
        ("{not json", "not as the page sends them"),
        (json.dumps(values), "not as the page sends them"),  # a list, as the form's fields were once sent
        (json.dumps({k: v for k, v in sent.items() if k != "lora.rank"}), "the setting `lora.rank` is missing"),
        (json.dumps({**sent, "../../etc": 1}), "`../../etc` is not a setting of this app"),
    ):
        with pytest.raises(ConfigError) as caught:
            form_from_json(bad)
        assert phrase in str(caught.value) and "the Train form" in str(caught.value), caught.value


def test_no_event_takes_the_form_s_fields_as_inputs(app_state):
    """Each field records its value in the page (a frontend-only event); the form's events take one hidden box."""
    config = build_app(app_state).get_config_file()
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"]}
    fields = {ids[f"cfg-{key.replace('.', '-')}"] for key in KEYS}
    backend = [d for d in config["dependencies"] if d["backend_fn"]]
    assert max(len(d["inputs"]) for d in backend) <= MOST_INPUTS
    form_events = [d for d in backend if ids["train-form-values"] in d["inputs"]]
    assert {d["api_name"] for d in form_events} >= {"start", "estimate", "resume", "render_regularization",
                                                     "save_preset"}  # fmt: skip
    assert all(d["js"] == train_tab.SEND_FORM_JS for d in form_events)
    remembered = [d for d in config["dependencies"] if not d["backend_fn"] and set(d["inputs"]) <= fields]
    assert {d["inputs"][0] for d in remembered} == fields and all(d["js"] for d in remembered)


def newest(sent: list, after: int, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while len(sent) <= after:
        assert time.monotonic() < deadline, "the page sent no form"
        time.sleep(0.1)
    time.sleep(0.5)  # an estimate that follows at once (trigger_mode always_last) may still come
    return sent[-1]


@pytest.mark.browser
def test_the_form_the_page_sends_is_the_form_it_shows(browser_page, app_state, monkeypatch):  # noqa: F811
    """After a preset is chosen (fields in closed accordions change too) and fields are typed in (one in an opened
    accordion), Check settings sends exactly that form; so do the estimate that follows the preset at once and the
    one a keystroke starts."""
    sent = []

    def recorded_estimate(app, form):
        sent.append(form)
        return estimate(app, form)

    estimate = train_tab.estimate
    monkeypatch.setattr(train_tab, "estimate", recorded_estimate)  # before the app is built, which binds it
    with app_page(browser_page) as page:
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-advanced").get_by_text("Advanced").first.click()
        page.locator("#train-section-sample").get_by_text("Samples during training").first.click()
        every = page.locator("#cfg-sample-every_n_steps input")
        expect(every).to_have_value(str(load_preset("demo-cpu").sample.every_n_steps))
        # The Dataset tab opens the demo's working copy as the page loads, and it becomes the form's dataset.
        dataset = str(app_state.roots.datasets / "demo")
        expect(page.locator("#cfg-dataset-path textarea")).to_have_value(dataset, timeout=60_000)
        before = len(sent)
        page.locator("#train-preset input").click()
        page.get_by_role("option", name="sd15-style").click()
        expected = form_values(load_preset("sd15-style"))
        expected[KEYS.index("dataset.path")] = dataset  # a preset keeps the dataset already chosen
        assert config_from_form(form_from_json(newest(sent, before))) == config_from_form(expected)

        expect(every).to_have_value(str(load_preset("sd15-style").sample.every_n_steps))
        before = len(sent)
        every.fill("13")  # the estimate a keystroke starts has the keystroke
        assert json.loads(newest(sent, before))["sample.every_n_steps"] == 13
        every.press("Tab")
        page.locator("#cfg-lora-rank input").fill("7")
        before = len(sent)
        page.locator("#train-check").click()
        expected[KEYS.index("lora.rank")], expected[KEYS.index("sample.every_n_steps")] = 7, 13
        checked = config_from_form(form_from_json(newest(sent, before)))
        assert checked == config_from_form(expected)
        assert checked.lora.rank == 7 and checked.sample.every_n_steps == 13 and checked.lora.alpha == 16

"""fp8_base: the UNet's frozen weights stored in float8 train exactly as a base rounded to float8 once, with the
LoRA, norms and text encoders at their own precision; the config, kohya's settings, the file and the estimate
know it."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from test_train import images, straight_and_resumed, tiny_config  # noqa: F401  (images is a fixture)
from torch import nn
from torch.nn.utils import parametrize
from transformers import CLIPTextModel

from lora_studio import estimate, fp8
from lora_studio import step as step_module
from lora_studio.config import TrainConfig, validate_config
from lora_studio.errors import ConfigError
from lora_studio.fp8 import STORAGE_DTYPE, adapter_modules
from lora_studio.lora_metadata import TrainingFacts, training_metadata
from lora_studio.train import TrainingError, load_model, prepare, run_training


def frozen_layers(unet: nn.Module) -> list[nn.Module]:
    adapters = adapter_modules(unet)
    return [m for m in unet.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and id(m) not in adapters]


def rounded_copy(folder, to, text_encoder: bool = False):
    """The diffusers folder with its UNet's (and text encoder's) Linear/Conv2d weights rounded to float8 once, and
    stored wide."""
    parts = {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet")}
    if text_encoder:
        parts["text_encoder"] = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    shutil.copytree(folder, to)
    for name, model in parts.items():
        with torch.no_grad():
            layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
            before = [m.weight.clone() for m in layers]
            for m in layers:
                m.weight.copy_(m.weight.to(STORAGE_DTYPE).float())
        assert any(not torch.equal(b, m.weight) for b, m in zip(before, layers, strict=True))  # not a no-op
        model.save_pretrained(to / name, safe_serialization=True)
    return to


def lora_gradients(session, batch: list[int]) -> dict[str, torch.Tensor]:
    """The trained parameters' gradients of one batch's loss, with fixed noise and timesteps."""
    session.optimizer.zero_grad(set_to_none=True)
    step_module.batch_loss(session, batch, step_module.sample_draws(5, 0, 0, batch)).backward()
    return {n: p.grad.clone() for n, p in session.base.unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_an_fp8_base_trains_as_a_base_rounded_to_fp8_once(tmp_path, tiny_folders, images, dora):  # noqa: F811
    """Same gradients, bit for bit, as a base whose UNet weights were rounded to float8 and saved wide: the widening
    is exact. With gradient checkpointing (required), so the recomputed blocks read the same weights. DoRA reads the
    base weights outside the layers' forwards (its magnitudes at the start, its norms each step), through the same
    widening."""
    lora = {"use_dora": True, "unet_targets": "full"} if dora else {}  # DoRA on the convs too
    settings = dict(gradient_checkpointing=True, lora=lora, optimizer={"max_train_steps": 2})
    narrowed = prepare(tiny_config(tmp_path / "a", tiny_folders, images, fp8_base=True, **settings))
    folder = rounded_copy(tiny_folders["sd1"], tmp_path / "rounded")
    rounded = prepare(tiny_config(tmp_path / "b", tiny_folders, images, base_model=str(folder), **settings))
    layers = frozen_layers(narrowed.base.unet)
    assert layers and all(parametrize.is_parametrized(m, "weight") for m in layers)
    assert all(m.parametrizations.weight.original.dtype == STORAGE_DTYPE for m in layers)
    assert all(m.weight.dtype == torch.float32 for m in layers)  # read widened, at the run's precision
    trained = [p for p in narrowed.base.unet.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    norms = [m for m in narrowed.base.unet.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert all(p.dtype == torch.float32 for e in narrowed.base.text_encoders for p in e.parameters())
    a, b = lora_gradients(narrowed, [0, 1]), lora_gradients(rounded, [0, 1])
    assert a.keys() == b.keys() and any(g.abs().sum() > 0 for g in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_sdxl_bf16_run_in_fp8_samples_writes_its_file_and_says_so(tmp_path, tiny_folders, images):  # noqa: F811
    """Widened to bf16 under the training autocast, on SDXL's UNet (its added embeddings), with samples rendered
    from the narrowed UNet during training."""
    sample = {"every_n_steps": 2, "strengths": [1.0], "seeds": [1], "num_inference_steps": 1, "width": 32,
              "height": 32}  # fmt: skip
    config = tiny_config(tmp_path, tiny_folders, images, base_model=str(tiny_folders["sdxl"]), mixed_precision="bf16",
                         fp8_base=True, gradient_checkpointing=True, sample=sample,
                         optimizer={"max_train_steps": 4})  # fmt: skip
    events = []
    done = run_training(config, on_event=events.append)
    shown = [type(e).__name__ for e in events if type(e).__name__ in ("SampleEvent", "ErrorEvent")]
    assert shown == ["SampleEvent"] * 2
    with safe_open(str(done.lora_path), "pt") as f:
        metadata = f.metadata()
        ups = [f.get_tensor(k) for k in f.keys() if "lora_up" in k]
    assert metadata["ss_fp8_base"] == "True" and metadata["ss_fp8_base_unet"] == "True"
    assert ups and any(u.abs().sum() > 0 for u in ups)
    losses = [json.loads(line)["loss"] for line in (done.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(loss == loss for loss in losses)
    assert "fp8_base: " in (done.run_dir / "log.txt").read_text()


def test_frozen_text_encoders_that_stay_on_the_device_are_narrowed_and_encode_as_rounded_ones(tmp_path, tiny_folders,
                                                                                                 images):  # noqa: F811
    """Captions that change each step (shuffled) keep a frozen text encoder on the device: fp8_base narrows it, and
    its outputs are exactly those of a text encoder rounded to float8 once. Cached or trained ones keep their
    precision (the cache is filled at full precision; a trained one would keep wide copies for the backward)."""
    settings = dict(fp8_base=True, gradient_checkpointing=True, lora={"train_text_encoder": False},
                    dataset={"shuffle_caption": True})  # fmt: skip
    config = tiny_config(tmp_path / "a", tiny_folders, images, **settings)
    assert config.fp8_text_encoders()
    narrowed = prepare(config).base
    (encoder,) = narrowed.text_encoders
    layers = [m for m in encoder.modules() if isinstance(m, nn.Linear)]
    assert layers and all(m.parametrizations.weight.original.dtype == STORAGE_DTYPE for m in layers)
    folder = rounded_copy(tiny_folders["sd1"], tmp_path / "rounded", text_encoder=True)
    rounded = prepare(tiny_config(tmp_path / "b", tiny_folders, images, base_model=str(folder), **settings)).base
    captions = ["zkz, a thing number 1", "a thing"]
    with torch.no_grad():
        a, b = (step_module.encode_text(base, captions, 1) for base in (narrowed, rounded))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cached = config.model_copy(update={"dataset": config.dataset.model_copy(update={
        "shuffle_caption": False, "cache_text_embeddings": True})})  # fmt: skip
    trained = config.model_copy(update={"lora": config.lora.model_copy(update={"train_text_encoder": True})})
    assert not cached.fp8_text_encoders() and not trained.fp8_text_encoders()
    facts = TrainingFacts("sd1", "demo", 64, 1, 1, 1, {}, {}, [], 0.0, 0.0)  # kohya's pair says which parts
    fp8_keys = lambda c: [training_metadata(c, facts)[k] for k in ("ss_fp8_base", "ss_fp8_base_unet")]  # noqa: E731
    assert fp8_keys(config) == ["True", "False"] and fp8_keys(cached) == fp8_keys(trained) == ["True", "True"]


def test_an_fp8_run_stopped_and_resumed_equals_one_straight_run(tmp_path, tiny_folders, images):  # noqa: F811
    """A resume loads and narrows the base again; the LoRA it finishes is the straight run's, bit for bit (with the
    text encoder narrowed too: shuffled captions, frozen encoder)."""
    straight, resumed, a, b = straight_and_resumed(tmp_path, tiny_folders, images, fp8_base=True,
                                                   gradient_checkpointing=True, lora={"train_text_encoder": False},
                                                   dataset={"shuffle_caption": True})  # fmt: skip
    assert resumed.step == 8 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_up" in k)


def test_fp8_base_needs_gradient_checkpointing():
    problems = TrainConfig(fp8_base=True).combination_problems()
    assert any("`fp8_base` needs gradient_checkpointing" in p for p in problems)
    assert not TrainConfig(fp8_base=True, gradient_checkpointing=True).fp8_problems()


def test_several_processes_and_a_device_without_float8_are_refused_before_the_model_loads(monkeypatch):
    config = TrainConfig(fp8_base=True, gradient_checkpointing=True, base_model="/no/such/model")
    with pytest.raises(TrainingError, match=r"fp8_base has not been checked on several GPUs \(2 processes"):
        load_model(config, SimpleNamespace(num_processes=2, device=torch.device("cpu")))
    assert fp8.storable_on("cpu")  # the probe itself, on this machine's device
    monkeypatch.setattr(fp8, "storable_on", lambda device: False)  # as on Apple's MPS, which has no float8
    with pytest.raises(TrainingError, match=r"fp8_base: this device \(cpu\) cannot hold 8-bit floats; set fp8_base"):
        load_model(config, SimpleNamespace(num_processes=1, device=torch.device("cpu")))


@pytest.mark.parametrize("keys, on", [
    ({"fp8_base": True}, True), ({"fp8_base_unet": True}, True), ({"fp8_base": False, "fp8_base_unet": True}, True),
    ({"fp8_base": False}, False), ({"fp8_base": "", "fp8_base_unet": False}, False),
])  # fmt: skip
def test_kohya_fp8_settings_migrate(keys, on):
    """sd-scripts' and kohya_ss's fp8_base (UNet and text encoders) and fp8_base_unet (the UNet) are both fp8_base
    here; the text encoders keep their precision."""
    config = validate_config({"pretrained_model_name_or_path": "demo", "gradient_checkpointing": True, **keys})
    assert config.fp8_base is on


def test_a_kohya_fp8_value_that_is_not_a_boolean_is_named():
    with pytest.raises(ConfigError, match="fp8_base"):
        validate_config({"pretrained_model_name_or_path": "demo", "fp8_base_unet": "sometimes"})


@pytest.mark.parametrize("preset, family", [("sdxl-low-vram", "sdxl"), ("sd15-low-vram", "sd1")])
def test_the_estimate_counts_the_unet_in_one_byte_and_the_wide_copies(preset, family):
    from lora_studio.config import load_preset

    config = load_preset(preset)
    plain = estimate.estimate_memory(family, config)
    narrow = estimate.estimate_memory(family, config.model_copy(update={"fp8_base": True}))
    copies = (estimate.FP8_OUTSIDE_UNITS[family] + estimate.FP8_LARGEST_UNIT[family]) * 2
    saved = estimate.FP8_STORED[family] * 2 - estimate.FP8_STORED[family] - copies
    assert plain.weights_gib - narrow.weights_gib == pytest.approx(saved / estimate.GIB)
    assert narrow.activations_gib == plain.activations_gib
    if family == "sdxl":  # SDXL's UNet: 4.8 GiB in bf16, 2.4 in float8, plus 0.2 of wide copies
        assert plain.weights_gib - narrow.weights_gib > 2.0
    # Shuffled captions keep the frozen text encoders on the GPU: narrowed too, without wide copies
    shuffled = config.model_copy(update={"dataset": config.dataset.model_copy(update={
        "shuffle_caption": True, "cache_text_embeddings": False})})  # fmt: skip
    wide = estimate.estimate_memory(family, shuffled)
    both = estimate.estimate_memory(family, shuffled.model_copy(update={"fp8_base": True}))
    encoders = estimate.FP8_TEXT_ENCODERS_STORED[family]
    assert wide.weights_gib - both.weights_gib == pytest.approx((saved + encoders) / estimate.GIB)

"""The EMA of the LoRA weights on a tiny seeded model: it follows its formula, files and samples use it as the
settings say, the live weights come back exactly, and a resume with it (and validation) stays bit-exact."""

import pytest
import torch
from safetensors.torch import load_file
from test_train import straight_and_resumed, tiny_config
from test_validation import make_images

from lora_studio.ema import lora_parameters
from lora_studio.outputs import save_lora_file
from lora_studio.step import training_step
from lora_studio.train import prepare
from lora_studio.validation import validation_pass


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("train"), 6)


def expected_decay(update: int, cap: float, warmup: bool) -> float:
    """diffusers' EMA decay schedule, written out: 0 at the first update, then ramping up to `cap`."""
    step = update - 1
    if step <= 0:
        return 0.0
    ramp = 1 - (1 + step) ** (-2 / 3) if warmup else (1 + step) / (10 + step)
    return min(ramp, cap)


@pytest.mark.parametrize("warmup", [True, False])
def test_the_average_follows_its_formula(tmp_path, tiny_folders, images, warmup):
    config = tiny_config(tmp_path, tiny_folders, images, lora={"ema_decay": 0.8, "ema_warmup": warmup},
                         optimizer={"learning_rate": 3e-3})  # fmt: skip
    session = prepare(config)
    params = lora_parameters(session.optimizer)
    average = None
    for update in range(1, 7):
        training_step(session, [0, 1])
        session.step += 1
        decay = expected_decay(update, 0.8, warmup)
        live = [p.detach().clone() for p in params]
        if average is None:
            average = live
        else:
            average = [decay * a + (1 - decay) * p for a, p in zip(average, live, strict=True)]
    assert session.ema.optimization_step == 6
    for shadow, mine in zip(session.ema.shadow_params, average, strict=True):
        assert torch.allclose(shadow, mine, atol=1e-7, rtol=1e-6)
    assert any(not torch.equal(s, p) for s, p in zip(session.ema.shadow_params, params, strict=True))


def test_files_and_samples_use_the_average_as_set_and_the_live_weights_come_back(tmp_path, tiny_folders, images):
    config = tiny_config(tmp_path, tiny_folders, images, lora={"ema_decay": 0.9},
                         validation={"fraction": 0.34}, optimizer={"learning_rate": 3e-3})  # fmt: skip
    session = prepare(config)
    for _ in range(5):
        training_step(session, [0, 1])
        session.step += 1
    params = lora_parameters(session.optimizer)
    live = [p.detach().clone() for p in params]
    averaged = save_lora_file(session, tmp_path / "ema.safetensors")
    with_ema = validation_pass(session)
    assert all(torch.equal(p, q) for p, q in zip(params, live, strict=True)), "the live weights are back, exactly"

    config.lora.ema_for_files = config.lora.ema_for_samples = False
    plain = save_lora_file(session, tmp_path / "live.safetensors")
    without = validation_pass(session)
    assert with_ema != without
    a, b = load_file(str(averaged)), load_file(str(plain))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with session.averaged():  # the file written with the average holds the average's weights
        same = save_lora_file(session, tmp_path / "again.safetensors")
        assert validation_pass(session) == with_ema
    c = load_file(str(same))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_a_run_with_the_average_and_validation_resumes_bit_exactly(tmp_path, tiny_folders, images):
    settings = {"lora": {"ema_decay": 0.9}, "validation": {"fraction": 0.34, "every_n_steps": 2}}
    straight, resumed, a, b = straight_and_resumed(tmp_path, tiny_folders, images, **settings)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    from lora_studio.runs import RunFolder

    first, second = RunFolder(straight.run_dir), RunFolder(resumed.run_dir)
    assert [r["validation_loss"] for r in first.validation_metrics() if r["step"] > 5] == [
        r["validation_loss"] for r in second.validation_metrics() if r["step"] > 5]  # fmt: skip

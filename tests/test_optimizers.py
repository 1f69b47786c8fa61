"""Lion and schedule-free AdamW on a tiny seeded model: each follows its own update rule, lowers the loss, and
resumes bit-exactly; schedule-free's averaged weights are what files and validation see, and the weights being
trained come back exactly after each use. LoRA+'s faster up matrices. Also the config's rules and the form's
optional betas."""

import json
import re
import sys
from contextlib import nullcontext

import lion_pytorch
import pytest
import schedulefree
import torch
from test_train import lora_tensors, straight_and_resumed, tiny_config
from test_validation import make_images

from lora_studio import session as session_module
from lora_studio import step as step_module
from lora_studio.config import ConfigError, TrainConfig, validate_config
from lora_studio.ema import lora_parameters
from lora_studio.estimate import estimate_memory
from lora_studio.lora_metadata import network_args
from lora_studio.optimizers import parameter_groups
from lora_studio.outputs import save_lora_file
from lora_studio.train import TrainingError, prepare, run_training
from lora_studio.ui.config_form import FIELD_BY_KEY, KEYS, config_from_form, form_values
from lora_studio.validation import validation_pass


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("train"), 6)


SCHEDULE_FREE = {"optimizer": "adamw_schedulefree", "learning_rate": 3e-3, "text_encoder_lr": 3e-3}


def steps(session, count: int) -> None:
    for _ in range(count):
        step_module.training_step(session, [0, 1])
        session.step += 1


def fixed_loss(session) -> float:
    """The loss on one batch at fixed noise and timesteps (16 draws per image), at the weights files get."""
    with torch.no_grad(), session.averaged():
        repeated = [0, 2] * 8
        return step_module.batch_loss(session, repeated, step_module.sample_draws(123, 0, 0, repeated)).item()


@pytest.mark.parametrize("settings", [
    {"optimizer": "lion", "learning_rate": 3e-3, "text_encoder_lr": 3e-3},
    {**SCHEDULE_FREE, "learning_rate": 1e-2, "text_encoder_lr": 1e-2},
], ids=["lion", "schedulefree"])  # fmt: skip
def test_training_lowers_the_loss(tmp_path, tiny_folders, images, settings):
    """30 steps on one batch (AdamW at 3e-3 takes this loss from 1.18 to 0.88 here; Lion at 3e-3 to 0.83,
    schedule-free at 1e-2 to 0.68, measured at the weights files get)."""
    config = tiny_config(tmp_path, tiny_folders, images, dataset={"repeats": 1},
                         optimizer={**settings, "max_train_steps": 30, "min_snr_gamma": None})  # fmt: skip
    session = prepare(config)
    before = fixed_loss(session)
    for _ in range(30):
        step_module.training_step(session, [0, 2])
        session.step += 1
    assert fixed_loss(session) < 0.8 * before


def test_lion_moves_every_weight_by_the_learning_rate(tmp_path, tiny_folders, images):
    """Lion's update is lr x sign(momentum mix): at the first step lora_up (all zeros) gets exactly +-lr wherever
    its gradient is not 0, and lora_down, whose gradient is 0 while up is 0, does not move."""
    config = tiny_config(tmp_path, tiny_folders, images,
                         optimizer={"optimizer": "lion", "learning_rate": 2e-4, "text_encoder_lr": 2e-4,
                                    "weight_decay": 0.0})  # fmt: skip
    session = prepare(config)
    inner = session.optimizer.optimizer
    assert isinstance(inner, lion_pytorch.Lion) and inner.param_groups[0]["betas"] == (0.9, 0.99)
    named = {n: p for model in session.models.values() for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in named.items()}
    steps(session, 1)
    ups = [n for n in named if "lora_B" in n]
    downs = [n for n in named if "lora_A" in n]
    assert ups and downs
    step = torch.tensor(2e-4)  # 0 - lr x sign: exactly the rate, in float32
    for name in ups:
        sizes = named[name].detach().abs()
        assert bool(((sizes == 0) | (sizes == step)).all()), name
    assert sum(int((named[n] != 0).sum()) for n in ups) > 0.9 * sum(named[n].numel() for n in ups)
    assert all(torch.equal(named[n], before[n]) for n in downs)


def test_betas_left_empty_are_the_optimizers_own_and_given_ones_are_used(tmp_path, tiny_folders, images):
    config = tiny_config(tmp_path, tiny_folders, images, optimizer={"betas": [0.8, 0.95]})
    assert prepare(config).optimizer.optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    plain = prepare(tiny_config(tmp_path / "b", tiny_folders, images))
    assert plain.config.optimizer.betas is None and plain.optimizer.optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_schedule_free_files_and_validation_use_its_average_and_training_goes_on_exactly(tmp_path, tiny_folders,
                                                                                          images, monkeypatch):
    config = tiny_config(tmp_path, tiny_folders, images, optimizer=SCHEDULE_FREE, validation={"fraction": 0.34})
    session = prepare(config)
    inner = session.optimizer.optimizer
    assert isinstance(inner, schedulefree.AdamWScheduleFree)
    steps(session, 4)
    params = lora_parameters(session.optimizer)
    training_point = [p.detach().clone() for p in params]
    beta1 = inner.param_groups[0]["betas"][0]
    average = [torch.lerp(y, inner.state[p]["z"], 1 - 1 / beta1) for y, p in zip(training_point, params, strict=True)]
    assert any(not torch.equal(a, y) for a, y in zip(average, training_point, strict=True))

    with session.averaged():
        assert all(torch.allclose(p, a, atol=1e-7) for p, a in zip(params, average, strict=True))
    assert all(torch.equal(p, y) for p, y in zip(params, training_point, strict=True)), "training point back"
    averaged_file = lora_tensors(save_lora_file(session, tmp_path / "sf.safetensors"))
    averaged_score = validation_pass(session)
    assert all(torch.equal(p, y) for p, y in zip(params, training_point, strict=True))

    # The same file and score from the average put in by hand, and different ones from the training point.
    monkeypatch.setattr(session_module, "schedule_free_average", lambda optimizer: nullcontext())
    live_file = lora_tensors(save_lora_file(session, tmp_path / "live.safetensors"))
    assert any(not torch.equal(averaged_file[k], live_file[k]) for k in live_file)
    assert validation_pass(session) != averaged_score
    with torch.no_grad():
        for p, a in zip(params, average, strict=True):
            p.copy_(a)
    by_hand = lora_tensors(save_lora_file(session, tmp_path / "hand.safetensors"))
    assert all(torch.allclose(by_hand[k], averaged_file[k], atol=1e-7) for k in by_hand)
    assert validation_pass(session) == pytest.approx(averaged_score, rel=1e-6)


def test_schedule_free_resumes_bit_exactly_through_checkpoints_and_validation(tmp_path, tiny_folders, images):
    """Each checkpoint and validation pass switches to the average and back; a resumed run must still end on
    the same bits as one that never stopped."""
    straight, resumed, a, b = straight_and_resumed(
        tmp_path, tiny_folders, images, optimizer={**SCHEDULE_FREE, "lr_warmup_steps": 3},
        save={"every_n_steps": 2}, validation={"fraction": 0.25, "every_n_steps": 3},
    )  # fmt: skip
    assert resumed.step == 8 and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_up" in k)
    lines = [json.loads(line) for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [line["lr"] for line in lines if "lr" in line]
    assert rates[:4] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3]), "the optimizer's own warm-up is what is logged"


@pytest.mark.parametrize(("settings", "phrase"), [
    ({"optimizer": {"lr_scheduler": "cosine"}}, "`optimizer.lr_scheduler` = 'cosine' cannot be used with "
                                                "adamw_schedulefree"),
    ({"lora": {"ema_decay": 0.99}}, "`lora.ema_decay` cannot be used with adamw_schedulefree"),
    ({"lora": {"scale_weight_norms": 1.0}}, "`lora.scale_weight_norms` cannot be used with adamw_schedulefree"),
])  # fmt: skip
def test_schedule_free_refuses_a_schedule_a_second_average_and_max_norm(settings, phrase):
    data = {"version": 1, "optimizer": {"optimizer": "adamw_schedulefree", "lr_scheduler": "constant"}}
    for section, values in settings.items():
        data[section] = {**data.get(section, {}), **values}
    problems = TrainConfig.model_validate(data).combination_problems()
    assert len(problems) == 1 and phrase in problems[0]
    assert validate_config({"optimizer": {"optimizer": "adamw_schedulefree", "lr_scheduler": "constant_with_warmup"}
                            }).combination_problems() == []  # fmt: skip


PRODIGY = {"optimizer": "prodigy", "learning_rate": 1.0, "text_encoder_lr": 1.0}


@pytest.mark.parametrize(("settings", "phrase"), [
    ({"optimizer": {"text_encoder_lr": 5e-5}}, "`optimizer.text_encoder_lr` = 5e-05 is not the UNet's rate (1)"),
    ({"lora": {"loraplus_lr_ratio": 16.0}}, "LoRA+ (`lora.loraplus_*lr_ratio`) trains the up matrices"),
    ({"lora": {"block_lr_weights": [1.0, 0.5, 1.0]}}, "`lora.block_lr_weights` gives blocks other rates (0.5)"),
    ({"optimizer": {"optimizer": "dadapt_adam", "unet_lr": 2.0}}, "`optimizer.text_encoder_lr` = 1 is not the UNet's "
                                                                  "rate (2): dadapt_adam finds one step size"),
    ({"optimizer": {"text_encoder_steps": 3}}, "`optimizer.text_encoder_steps` cannot stop the text encoder with "
                                               "prodigy: at rate 0 its step still moves the weights"),
])  # fmt: skip
def test_prodigy_refuses_weights_at_other_rates_before_its_step_would(tmp_path, tiny_folders, images, settings,
                                                                      phrase):  # fmt: skip
    """Prodigy's step raises on parameter groups at different rates (a bare RuntimeError in the middle of a run);
    the config names the setting instead, so Check settings and the CLI say it before anything loads."""
    config = tiny_config(tmp_path, tiny_folders, images, optimizer={**PRODIGY, **settings.get("optimizer", {})},
                         lora=settings.get("lora", {}))  # fmt: skip
    problems = config.combination_problems()
    assert len(problems) == 1 and phrase in problems[0], problems
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        prepare(config)


def test_prodigy_trains_at_one_rate_and_its_own_step_refuses_others(tmp_path, tiny_folders, images):
    """What the rule above stands in for: Prodigy's first step raises on groups at different rates. The same rate
    everywhere, a block left out at 0, or the text encoder not trained are fine."""
    config = tiny_config(tmp_path, tiny_folders, images, optimizer=PRODIGY, lora={"block_lr_weights": [1, 0, 1]})
    assert not config.combination_problems()
    session = prepare(config)
    assert len(session.optimizer.optimizer.param_groups) == 2  # the UNet's and the text encoders', both at 1
    step_module.training_step(session, [0, 1])
    session.optimizer.optimizer.param_groups[-1]["lr"] = 0.5
    with pytest.raises(RuntimeError, match="different lr values"):
        step_module.training_step(session, [0, 1])
    assert not TrainConfig(optimizer={"optimizer": "prodigy", "learning_rate": 1.0},
                           lora={"train_text_encoder": False}).combination_problems()  # fmt: skip


@pytest.mark.parametrize("settings", [{"optimizer": "adamw"}, {"optimizer": "lion", "learning_rate": 1e-4}],
                         ids=["adamw", "lion"])  # fmt: skip
def test_the_text_encoder_stops_after_its_steps_and_the_unet_goes_on(tmp_path, tiny_folders, images, settings):
    """optimizer.text_encoder_steps = 3: from the fourth step the text encoders' rate is 0 and their weights stay
    exactly as they were (AdamW's and Lion's weight decay scale with the rate too)."""
    config = tiny_config(tmp_path, tiny_folders, images, optimizer={**settings, "text_encoder_steps": 3,
                                                                    "max_train_steps": 6})  # fmt: skip
    session = prepare(config)
    encoder = [p for e in session.base.text_encoders for p in e.parameters() if p.requires_grad]
    unet = [p for p in session.base.unet.parameters() if p.requires_grad]
    snapshot = lambda params: [p.detach().clone() for p in params]  # noqa: E731
    before = snapshot(encoder)
    steps(session, 3)
    at_three, unet_at_three = snapshot(encoder), snapshot(unet)
    assert any(not torch.equal(a, b) for a, b in zip(before, at_three, strict=True)), "it trained until then"
    steps(session, 3)
    assert all(torch.equal(a, b) for a, b in zip(at_three, snapshot(encoder), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(unet_at_three, snapshot(unet), strict=True))
    groups = session.optimizer.optimizer.param_groups
    assert [g["lr"] for g in groups if g["part"] == "text_encoders"] == [0.0]
    assert all(g["lr"] > 0 for g in groups if g["part"] == "unet")


def test_a_stopped_text_encoder_resumes_bit_exactly_and_needs_a_trained_one(tmp_path, tiny_folders, images):
    """Stopped at step 4, the run is stopped at 5 and resumed: the same file as straight through."""
    _, resumed, a, b = straight_and_resumed(tmp_path, tiny_folders, images, optimizer={"text_encoder_steps": 4})
    assert resumed.step == 8 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    problems = TrainConfig(optimizer={"text_encoder_steps": 4}, lora={"train_text_encoder": False}
                           ).combination_problems()  # fmt: skip
    assert problems == ["`optimizer.text_encoder_steps` = 4 stops a text encoder that does not train "
                        "(lora.train_text_encoder = false); set it to 0, or train the text encoder"]
    schedule_free = TrainConfig(optimizer={**SCHEDULE_FREE, "lr_scheduler": "constant", "text_encoder_steps": 4})
    assert "cannot stop the text encoder with adamw_schedulefree" in schedule_free.combination_problems()[0]


def test_the_form_refuses_schedule_free_with_a_schedule():
    """The form's values carry no version, like a kohya file: kohya's do-nothing schedule must not be put in
    here (it once was, and the form's cosine schedule vanished without a word)."""
    values = form_values(TrainConfig())  # lr_scheduler 'cosine' by default
    values[KEYS.index("optimizer.optimizer")] = "adamw_schedulefree"
    with pytest.raises(ConfigError, match="`optimizer.lr_scheduler` = 'cosine' cannot be used with adamw_sched"):
        config_from_form(values)


def test_kohya_optimizer_names_migrate():
    for kohya, ours in [("Lion", "lion"), ("Lion8bit", "lion8bit"), ("AdamWScheduleFree", "adamw_schedulefree")]:
        assert validate_config({"optimizer_type": kohya, "learning_rate": 1e-4}).optimizer.optimizer == ours
    # kohya's DAdaptAdam as its guides set it up: every rate 1, decoupled weight decay
    dadapt = validate_config({"optimizer_type": "DAdaptAdam", "learning_rate": 1.0, "unet_lr": 1.0,
                              "text_encoder_lr": 1.0, "optimizer_args": ["decouple=True", "weight_decay=0.01"]})
    assert (dadapt.optimizer.optimizer, dadapt.optimizer.weight_decay) == ("dadapt_adam", 0.01)
    with pytest.raises(ConfigError, match="DAdaptLion"):  # the other D-Adaptation variants are named, not guessed
        validate_config({"optimizer_type": "DAdaptLion", "learning_rate": 1.0})
    # kohya runs schedule-free optimizers with no schedule at all (its lr_scheduler and warm-up are ignored)
    migrated = validate_config({"optimizer_type": "AdamWScheduleFree", "lr_scheduler": "cosine",
                                "lr_warmup_steps": 100}).optimizer  # fmt: skip
    assert (migrated.lr_scheduler, migrated.lr_warmup_steps) == ("constant", 0)


def test_missing_packages_and_cpu_only_8bit_name_what_to_do(tmp_path, tiny_folders, images):
    with pytest.raises(TrainingError, match="lion8bit .bitsandbytes. needs a CUDA GPU.*optimizer = 'lion'"):
        run_training(tiny_config(tmp_path, tiny_folders, images, optimizer={"optimizer": "lion8bit"}))
    for module, package, name in [("lion_pytorch", "lion-pytorch", "lion"),
                                  ("schedulefree", "schedulefree", "adamw_schedulefree")]:  # fmt: skip
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # what the import meets when the package is not installed
            with pytest.raises(TrainingError, match=f"pip install {package}.*optimizer = 'adamw'"):
                run_training(tiny_config(tmp_path / name, tiny_folders, images, optimizer={"optimizer": name}))


def test_the_form_leaves_betas_empty_and_reads_them_back():
    field = FIELD_BY_KEY["optimizer.betas"]
    assert field.kind == "list" and field.optional
    values = form_values(TrainConfig())
    index = KEYS.index("optimizer.betas")
    assert values[index] == ""
    assert config_from_form(values).optimizer.betas is None
    values[index] = "[0.9, 0.99]"
    assert config_from_form(values).optimizer.betas == (0.9, 0.99)
    values[index] = "[0.9, 1.5]"
    with pytest.raises(ConfigError, match=r"optimizer.betas.*both betas must lie in \[0, 1\)"):
        config_from_form(values)


def test_the_memory_estimate_counts_each_optimizers_state():
    def lora_state(optimizer: str) -> float:
        config = validate_config({"optimizer": {"optimizer": optimizer, "lr_scheduler": "constant"}})
        return estimate_memory("sd1", config).lora_state_gib

    assert lora_state("lion8bit") < lora_state("lion") < lora_state("adamw") < lora_state("adamw_schedulefree")


def largest_up_weight(session) -> float:
    ups = [p for model in session.models.values() for n, p in model.named_parameters() if ".lora_B." in n]
    return max(float(p.detach().abs().max()) for p in ups)


def test_loraplus_gives_the_up_matrices_their_own_faster_group(tmp_path, tiny_folders, images):
    """kohya's split: per part (UNet, text encoder) the down matrices at the part's rate, the up ones at ratio x it.
    AdamW's first step moves each weight by about its rate, and the up matrices start at 0: after one step the
    largest up weight is 16 times what it is without LoRA+."""
    rates = {"learning_rate": 1e-3, "text_encoder_lr": 5e-4, "weight_decay": 0.0}
    plus = prepare(tiny_config(tmp_path / "p", tiny_folders, images, lora={"loraplus_lr_ratio": 16},
                               optimizer=rates))  # fmt: skip
    groups = plus.optimizer.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 16e-3, 5e-4, 8e-3])
    unet = dict(plus.base.unet.named_parameters())
    up_ids = {id(p) for n, p in unet.items() if ".lora_B." in n and p.requires_grad}
    assert up_ids and {id(p) for p in groups[1]["params"]} == up_ids
    assert not {id(p) for p in groups[0]["params"]} & up_ids
    plain = prepare(tiny_config(tmp_path / "a", tiny_folders, images, optimizer=rates))
    assert len(plain.optimizer.optimizer.param_groups) == 2
    steps(plus, 1)
    steps(plain, 1)
    assert largest_up_weight(plus) / largest_up_weight(plain) == pytest.approx(16, rel=0.01)
    # kohya's per-part ratios: a part's own ratio, else the common one; a part with neither is one group
    both = {"loraplus_lr_ratio": 16, "loraplus_text_encoder_lr_ratio": 4}
    for lora, expected in (({"loraplus_unet_lr_ratio": 8}, [1e-3, 8e-3, 5e-4]), (both, [1e-3, 16e-3, 5e-4, 2e-3])):
        config = tiny_config(tmp_path / "p", tiny_folders, images, lora=lora, optimizer=rates)
        assert [g["lr"] for g in parameter_groups(config, plus.base)] == pytest.approx(expected)


def test_loraplus_is_recorded_as_kohya_does_and_refused_where_it_has_no_meaning():
    config = validate_config({"loraplus_lr_ratio": 16, "network_dim": 8})  # kohya_ss's flat key migrates
    assert config.lora.loraplus_lr_ratio == 16 and network_args(config.lora)["loraplus_lr_ratio"] == "16"
    assert "loraplus_lr_ratio" not in network_args(TrainConfig().lora)
    parts = validate_config({"network_args": ["loraplus_unet_lr_ratio=8", "loraplus_text_encoder_lr_ratio=4"]})
    assert parts.lora.loraplus_ratios() == (8, 4)
    assert {k: v for k, v in network_args(parts.lora).items() if "loraplus" in k} == {
        "loraplus_unet_lr_ratio": "8", "loraplus_text_encoder_lr_ratio": "4"}
    with pytest.raises(ConfigError, match="loraplus_lr_ratio speeds up a LoRA's up matrices; network = 'loha'"):
        validate_config({"version": 1, "lora": {"network": "loha", "loraplus_lr_ratio": 16}})


PRODIGY = {"optimizer": "prodigy", "learning_rate": 1.0, "text_encoder_lr": 1.0, "min_snr_gamma": None}


def test_prodigys_options_reach_it_and_change_its_estimate(tmp_path, tiny_folders, images):
    """kohya guides' d_coef=2 use_bias_correction=True safeguard_warmup=True: each reaches Prodigy's groups; d_coef
    scales the estimate d it grows (d = max(d, d_coef x its estimate))."""
    plain = prepare(tiny_config(tmp_path / "a", tiny_folders, images, optimizer=PRODIGY))
    tuned = prepare(tiny_config(tmp_path / "b", tiny_folders, images, optimizer={
        **PRODIGY, "prodigy_d_coef": 2.0, "prodigy_bias_correction": True, "prodigy_safeguard_warmup": True}))
    options = {(g["d_coef"], g["use_bias_correction"], g["safeguard_warmup"]) for g in tuned.optimizer.param_groups}
    assert options == {(2.0, True, True)}
    assert {g["d_coef"] for g in plain.optimizer.param_groups} == {1.0}
    doubled = prepare(tiny_config(tmp_path / "c", tiny_folders, images,
                                  optimizer={**PRODIGY, "prodigy_d_coef": 2.0}))  # fmt: skip
    steps(plain, 6)
    steps(doubled, 6)
    d_plain, d_doubled = plain.optimizer.param_groups[0]["d"], doubled.optimizer.param_groups[0]["d"]
    assert d_plain > 1e-6 and d_doubled > 1.5 * d_plain  # it grew from d0 = 1e-6, about twice as far with d_coef 2


def test_prodigys_options_migrate_from_kohya_and_are_refused_for_another_optimizer():
    args = "decouple=True d_coef=2 use_bias_correction=True safeguard_warmup=True weight_decay=0.01"
    config = validate_config({"optimizer_type": "Prodigy", "learning_rate": 1.0, "optimizer_args": args})
    opt = config.optimizer
    assert (opt.prodigy_d_coef, opt.prodigy_bias_correction, opt.prodigy_safeguard_warmup) == (2.0, True, True)
    with pytest.raises(ConfigError, match="decouple=False"):
        validate_config({"optimizer_type": "Prodigy", "optimizer_args": ["decouple=False"]})
    with pytest.raises(ConfigError, match=r"`optimizer.prodigy_d_coef = 2.0` acts only with optimizer = 'prodigy'"):
        validate_config({"optimizer": {"optimizer": "adamw", "prodigy_d_coef": 2.0}})


def test_the_polynomial_schedule_takes_kohyas_power():
    """lr_scheduler_power bends diffusers' polynomial decay: halfway through, power 1 has half the rate left, power
    2 a quarter, power 0.5 about 71% (diffusers decays to 1e-7, not to 0)."""
    from lora_studio.optimizers import make_lr_scheduler

    def halfway(power: float) -> float:
        config = validate_config({"version": 1, "optimizer": {"lr_scheduler": "polynomial", "learning_rate": 1.0,
                                                               "lr_scheduler_power": power}})  # fmt: skip
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        schedule = make_lr_scheduler(config, optimizer, total=10)
        for _ in range(5):
            optimizer.step()
            schedule.step()
        return optimizer.param_groups[0]["lr"]

    assert halfway(1.0) == pytest.approx(0.5, abs=1e-6) and halfway(2.0) == pytest.approx(0.25, abs=1e-6)
    assert halfway(0.5) == pytest.approx(0.5**0.5, abs=1e-6)
    assert validate_config({"lr_scheduler": "polynomial", "lr_scheduler_power": 2}).optimizer.lr_scheduler_power == 2

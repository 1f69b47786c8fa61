"""kohya_ss's saved settings as its GUI writes them (JSON, every form field, strings for numbers, "" for unset) and the
sd-scripts TOML it generates: what acts is mapped, what changes no weights is let go, what has no setting here is
refused by name unless it is off."""

import json

import pytest

from lora_studio.config import load_config, validate_config
from lora_studio.errors import ConfigError, LoraStudioError
from lora_studio.ui.config_form import KEYS, config_from_form, form_values

# A kohya_ss "Save" of a plain SDXL LoRA: the GUI's own key names and types (written for this test).
GUI_SAVE = {
    "LoRA_type": "Standard", "LyCORIS_preset": "full", "adaptive_noise_scale": 0, "additional_parameters": "",
    "block_alphas": "", "block_dims": "", "block_lr_zero_threshold": "", "bucket_no_upscale": True,
    "bucket_reso_steps": 64, "cache_latents": True, "cache_latents_to_disk": True,
    "caption_dropout_every_n_epochs": 0.0, "caption_dropout_rate": 0, "caption_extension": ".caption",
    "clip_skip": "1", "color_aug": False, "conv_alpha": 16, "conv_block_alphas": "", "conv_block_dims": "",
    "conv_dim": 16, "dataset_config": "", "decompose_both": False, "dim_from_weights": False, "down_lr_weight": "",
    "dynamo_backend": "no", "enable_bucket": True, "epoch": 12, "factor": -1, "flip_aug": False, "fp8_base": False,
    "full_bf16": False, "full_fp16": False, "gpu_ids": "", "gradient_accumulation_steps": 1,
    "gradient_checkpointing": True, "huber_c": 0.1, "huber_schedule": "snr", "ip_noise_gamma": 0,
    "keep_tokens": "1", "learning_rate": 0.0001, "logging_dir": "/home/me/logs", "loss_type": "l2",
    "lora_network_weights": "", "lr_scheduler": "cosine", "lr_scheduler_args": "", "lr_scheduler_num_cycles": "1",
    "lr_scheduler_power": "", "lr_warmup": 10, "max_bucket_reso": 2048, "max_data_loader_n_workers": "0",
    "max_resolution": "1024,1024", "max_timestep": 1000, "max_token_length": "75", "max_train_epochs": "",
    "max_train_steps": "400", "mem_eff_attn": False, "mid_lr_weight": "", "min_bucket_reso": 256,
    "min_snr_gamma": 5, "min_timestep": 0, "mixed_precision": "bf16", "model_list": "custom", "module_dropout": 0,
    "multires_noise_discount": 0.3, "multires_noise_iterations": 6, "network_alpha": 16, "network_dim": 32,
    "network_dropout": 0, "noise_offset": 0.05, "noise_offset_type": "Original", "num_cpu_threads_per_process": 2,
    "optimizer": "AdamW8bit", "optimizer_args": "weight_decay=0.05", "output_dir": "/home/me/out",
    "output_name": "my-style", "persistent_data_loader_workers": False,
    "pretrained_model_name_or_path": "/models/sdxl.safetensors", "prior_loss_weight": 1.0, "random_crop": False,
    "rank_dropout": 0, "reg_data_dir": "", "resume": "", "sample_every_n_epochs": 0, "sample_every_n_steps": 100,
    "sample_prompts": "zkz, a red star --w 1024 --h 1024\n\nzkz, a blue circle --n blurry",
    "sample_sampler": "k_euler_a",
    "save_every_n_epochs": 2, "save_every_n_steps": 0, "save_last_n_steps": 0, "save_last_n_steps_state": 0,
    "save_model_as": "safetensors", "save_precision": "bf16", "save_state": False, "scale_v_pred_loss_like_noise_pred":
    False, "scale_weight_norms": 0, "sdxl": True, "sdxl_cache_text_encoder_outputs": False, "sdxl_no_half_vae": True,
    "seed": "1234", "shuffle_caption": True, "stop_text_encoder_training": 0, "text_encoder_lr": 5e-05,
    "train_batch_size": 2, "train_data_dir": "/data/img", "train_on_input": True, "training_comment": "zkz style",
    "unet_lr": 0.0001, "unit": 1, "up_lr_weight": "", "use_cp": False, "use_wandb": False, "v2": False,
    "v_parameterization": False, "v_pred_like_loss": 0, "vae": "", "vae_batch_size": 0, "wandb_api_key": "",
    "weighted_captions": False, "xformers": "xformers",
}  # fmt: skip


def saved(tmp_path, **changes):
    path = tmp_path / "kohya_ss.json"
    path.write_text(json.dumps({**GUI_SAVE, **changes}))
    return path


def test_a_kohya_ss_save_loads_with_what_it_sets(tmp_path):
    config = load_config(saved(tmp_path))
    assert (config.name, config.base_model, config.output_dir) == ("my-style", "/models/sdxl.safetensors",
                                                                   "/home/me/out")  # fmt: skip
    assert (config.family, config.seed, config.clip_skip, config.mixed_precision) == ("sdxl", 1234, 1, "bf16")
    data = config.dataset
    assert (data.path, data.resolution, data.batch_size, data.caption_extension) == ("/data/img", 1024, 2, ".caption")
    assert (data.keep_tokens, data.shuffle_caption, data.bucket_no_upscale) == (1, True, True)
    assert data.max_bucket_reso == 2048
    lora = config.lora
    # a Standard LoRA: the conv_dim the GUI saves beside it does not act in kohya_ss, nor here
    assert (lora.network, lora.rank, lora.alpha, lora.conv_rank, lora.unet_targets) == ("lora", 32, 16, None,
                                                                                        "attn-ff")  # fmt: skip
    opt = config.optimizer
    assert (opt.optimizer, opt.learning_rate, opt.unet_lr, opt.text_encoder_lr) == ("adamw8bit", 1e-4, 1e-4, 5e-5)
    assert (opt.max_train_steps, opt.max_train_epochs, opt.weight_decay) == (400, 12, 0.05)
    assert opt.lr_warmup_steps == 40  # 10% of 400 steps, as kohya_ss works it out
    # noise_offset_type Original: kohya_ss passes the offset and not the multi-resolution noise
    assert (opt.noise_offset, opt.multires_noise_iterations, opt.min_snr_gamma) == (0.05, 0, 5)
    assert config.sample.prompts == ["zkz, a red star --w 1024 --h 1024", "zkz, a blue circle --n blurry"]
    assert (config.sample.sampler, config.sample.every_n_steps) == ("euler_a", 100)
    assert (config.save.precision, config.save.every_n_epochs, config.save.save_state) == ("bf16", 2, False)


def test_kohya_ss_network_types_and_what_belongs_to_them(tmp_path):
    lokr = load_config(saved(tmp_path, LoRA_type="LyCORIS/LoKr", factor=8, LyCORIS_preset="full", conv_dim=4,
                             conv_alpha=1))  # fmt: skip
    assert (lokr.lora.network, lokr.lora.lokr_factor) == ("lokr", 8)
    assert (lokr.lora.unet_targets, lokr.lora.conv_rank) == ("full", 4)
    locon = load_config(saved(tmp_path, LoRA_type="Kohya LoCon"))
    assert (locon.lora.network, locon.lora.unet_targets, locon.lora.conv_rank) == ("lora", "full", 16)
    # LyCORIS' attn-mlp preset has no convs: the conv_dim saved beside it has nothing to act on
    loha = load_config(saved(tmp_path, LoRA_type="LyCORIS/LoHa", LyCORIS_preset="attn-mlp", conv_dim=8))
    assert (loha.lora.network, loha.lora.unet_targets, loha.lora.conv_rank) == ("loha", "attn-ff", None)
    with pytest.raises(ConfigError, match="LoRA_type 'LyCORIS/iA3' has no equivalent here"):
        load_config(saved(tmp_path, LoRA_type="LyCORIS/iA3"))


def test_kohya_ss_rates_steps_and_noise_as_the_gui_means_them(tmp_path):
    unet_only = load_config(saved(tmp_path, text_encoder_lr=0))
    assert unet_only.lora.train_text_encoder is False
    both_unset = load_config(saved(tmp_path, text_encoder_lr=0, unet_lr=0, learning_rate=3e-4))
    assert both_unset.optimizer.unet_lr is None and both_unset.optimizer.text_encoder_lr is None  # learning_rate
    assert both_unset.lora.train_text_encoder
    with pytest.raises(ConfigError, match="unet_lr = 0 trains the text encoder alone"):
        load_config(saved(tmp_path, unet_lr=0))
    by_epochs = load_config(saved(tmp_path, max_train_steps="0", lr_warmup=0))
    assert (by_epochs.optimizer.max_train_steps, by_epochs.optimizer.max_train_epochs) == (None, 12)
    with pytest.raises(ConfigError, match=r"lr_warmup = 10% of steps it counts from the dataset"):
        load_config(saved(tmp_path, max_train_steps=""))
    multires = load_config(saved(tmp_path, noise_offset_type="Multires"))
    assert (multires.optimizer.noise_offset, multires.optimizer.multires_noise_iterations) == (0.0, 6)
    assert load_config(saved(tmp_path, max_token_length="225")).max_token_length == 225  # long tag captions
    assert load_config(saved(tmp_path, vae="/models/sdxl_vae.safetensors")).vae == "/models/sdxl_vae.safetensors"
    # sd-scripts (no GUI): the text encoder trains at learning_rate unless text_encoder_lr is given
    assert validate_config({"learning_rate": 2e-4, "network_dim": 4}).optimizer.text_encoder_lr is None


@pytest.mark.parametrize(("change", "phrase"), [
    ({"full_bf16": True}, "`full_bf16` = True has no setting in this app; set it to False"),
    ({"face_crop_aug_range": "2.0,4.0"}, "`face_crop_aug_range` = '2.0,4.0' has no setting in this app; set it to "
                                         "empty"),
    ({"save_model_as": "ckpt"}, "`save_model_as` = 'ckpt' has no setting in this app; set it to 'safetensors'"),
    ({"sample_sampler": "dpm_2_a"}, "sample_sampler 'dpm_2_a' is not one here"),
    ({"sample_prompts": "/home/me/prompts.txt"}, "sample_prompts names the file"),
    ({"train_norm": True}, "`train_norm`"),
])  # fmt: skip
def test_what_has_no_setting_here_is_refused_by_name_unless_off(tmp_path, change, phrase):
    with pytest.raises(ConfigError) as caught:
        load_config(saved(tmp_path, **change))
    assert phrase in str(caught.value)


def test_settings_that_change_no_weights_are_let_go_and_an_empty_base_model_stays_empty(tmp_path):
    loose = load_config(saved(tmp_path, xformers="sdpa", logging_dir="/x", wandb_api_key="secret", highvram=True))
    assert loose == load_config(saved(tmp_path))
    empty = load_config(saved(tmp_path, pretrained_model_name_or_path=""))
    assert empty.base_model == "" and any("`base_model` is empty" in p for p in empty.training_problems())
    # the Train form's values pass the same migration: its empty base model stays empty too
    values = form_values(validate_config({}))
    values[KEYS.index("base_model")] = ""
    assert config_from_form(values).base_model == ""


def test_the_sd_scripts_toml_kohya_ss_writes_loads(tmp_path):
    path = tmp_path / "config_lora-20260101.toml"
    path.write_text("""
pretrained_model_name_or_path = "/models/sd15.safetensors"
train_data_dir = "/data/img"
output_dir = "/out"
output_name = "x"
logging_dir = "/logs"
network_module = "networks.lora"
network_args = ["conv_dim=8", "conv_alpha=4"]
network_dim = 16
network_alpha = 8
optimizer_type = "Prodigy"
optimizer_args = ["decouple=True", "growth_rate=1.02"]
learning_rate = 1.0
lr_scheduler = "cosine"
lr_warmup_steps = 0
lr_scheduler_num_cycles = 1
max_train_steps = 1000
epoch = 10
resolution = "512,512"
train_batch_size = 1
xformers = true
dynamo_backend = "no"
max_data_loader_n_workers = 0
sdpa = false
caption_extension = ".txt"
keep_tokens = 0
save_model_as = "safetensors"
mixed_precision = "fp16"
save_precision = "fp16"
huber_c = 0.1
huber_schedule = "snr"
loss_type = "l2"
lr_scheduler_args = []
max_timestep = 1000
max_token_length = 75
min_snr_gamma = 5
""")
    with pytest.raises(ConfigError, match="`optimizer_args` entry 'growth_rate=1.02' is not a setting"):
        load_config(path)  # Prodigy's growth_rate has no setting here: refused by name
    path.write_text(path.read_text().replace('"growth_rate=1.02"', '"d_coef=2"'))
    config = load_config(path)
    assert (config.lora.rank, config.lora.conv_rank, config.lora.unet_targets) == (16, 8, "full")
    assert (config.optimizer.optimizer, config.optimizer.max_train_steps, config.optimizer.max_train_epochs) == (
        "prodigy", 1000, 10)
    assert config.dataset.resolution == 512 and config.mixed_precision == "fp16"
    assert config.optimizer.prodigy_d_coef == 2


def test_the_train_tab_imports_a_kohya_ss_save_into_the_form(app_state, tmp_path):
    """The Train tab's import: an upload fills the form (paths as written: Start confines them); a save that names a
    dataset config, a file that is not an upload, or another kind of file is refused with a sentence."""
    from lora_studio.ui import train_tab

    uploads = tmp_path / "gradio-uploads"
    upload = uploads / "abc123" / "kohya_ss.json"
    upload.parent.mkdir()
    upload.write_text(json.dumps(GUI_SAVE))
    *values, note, box = train_tab.import_settings(app_state, str(upload))
    assert values == form_values(load_config(saved(tmp_path)))
    assert "Imported **kohya_ss.json**" in note and box is None  # the box is emptied for the next import
    # settings that cannot train here: every reason listed, the form left as it is (each field skipped)
    named = uploads / "abc123" / "with-dataset.json"
    named.write_text(json.dumps({**GUI_SAVE, "dataset_config": "/etc/sets.toml"}))
    *values, note, box = train_tab.import_settings(app_state, str(named))
    assert all(isinstance(v, dict) and v.get("__type__") == "update" and len(v) == 1 for v in values), values[:2]
    assert "**with-dataset.json was not imported**" in note and box is None
    assert "names the kohya dataset config '/etc/sets.toml', which an import cannot bring along" in note
    refused = uploads / "abc123" / "glora.json"
    refused.write_text(json.dumps({**GUI_SAVE, "LoRA_type": "LyCORIS/GLoRA", "full_fp16": True}))
    note = train_tab.import_settings(app_state, str(refused))[-2]
    assert "LoRA_type 'LyCORIS/GLoRA' has no equivalent" in note and "`full_fp16` = True" in note
    with pytest.raises(LoraStudioError, match="is not an upload"):
        train_tab.import_settings(app_state, str(saved(tmp_path)))
    other = uploads / "abc123" / "notes.txt"
    other.write_text("lr = 1")
    with pytest.raises(LoraStudioError, match="is not a .json or .toml config"):
        train_tab.import_settings(app_state, str(other))

"""kohya_ss's saved settings (bmaltais' GUI, the JSON its "Save" writes, and the TOML it hands sd-scripts) made into
the flat sd-scripts keys the config's version-0 migration takes.

The GUI keeps every field of its form in the file, whether it acts or not: text fields hold "" when unset, numbers are
often strings ("1", "12345"), conv_dim is saved for a plain LoRA that ignores it, and its own names stand beside
sd-scripts' (`optimizer`, `epoch`, `max_resolution`, `lr_warmup` as a percentage, `LoRA_type`). Each key is one of:
  - renamed or computed into sd-scripts' name (the migration then maps that one);
  - without effect on the trained weights (logging, uploads, data-loader workers, the attention kernel): let go;
  - a feature this app does not have: accepted at its "off" value, refused by name otherwise (never silently lost).
Keys not named here stay as they are, so validation names any it does not know.
"""

from __future__ import annotations

from typing import Any

# Where the trained weights do not depend on the value: how the run is logged, uploaded, launched or fed, and which
# attention kernel computes the same attention.
NO_EFFECT = {
    "logging_dir", "log_prefix", "log_with", "log_tracker_name", "log_tracker_config", "log_config", "use_wandb",
    "wandb_api_key", "wandb_run_name", "huggingface_repo_id", "huggingface_token", "huggingface_repo_type",
    "huggingface_repo_visibility", "huggingface_path_in_repo", "save_state_to_huggingface", "async_upload",
    "resume_from_huggingface", "max_data_loader_n_workers", "persistent_data_loader_workers",
    "num_cpu_threads_per_process", "num_processes", "num_machines", "multi_gpu", "gpu_ids", "main_process_port",
    "extra_accelerate_launch_args", "dynamo_backend", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic",
    "xformers", "sdpa", "mem_eff_attn", "highvram", "lowvram", "lowram", "vae_batch_size", "no_half_vae",
    "sdxl_no_half_vae", "model_list", "training_comment", "metadata_author", "metadata_description",
    "metadata_license", "metadata_tags", "metadata_title", "save_state_on_train_end", "cache_info", "skip_cache_check",
    "max_token_length_check", "additional_parameters_check",
}  # fmt: skip

# kohya features with no setting here: fine at the value that turns them off, refused otherwise.
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "full_bf16": (False,), "full_fp16": (False,), "stop_text_encoder_training": (0,),
    "stop_text_encoder_training_pct": (0,),
    "no_token_padding": (False,), "additional_parameters": (), "lr_scheduler_args": (),
    "lr_scheduler_type": (), "decompose_both": (False,), "use_cp": (False,), "use_tucker": (False,),
    "use_scalar": (False,), "rank_dropout_scale": (False,), "constrain": (0,), "rescaled": (False,),
    "train_norm": (False,), "bypass_mode": (False,), "unit": (1,), "caption_separator": (",",),
    "face_crop_aug_range": (),
    "save_last_n_steps_state": (0,),
    "save_last_n_epochs_state": (0,), "save_every_n_steps_state": (0,), "flux1_checkbox": (False,),
    "sd3_checkbox": (False,), "resume": (),
    "save_model_as": ("safetensors",), "masked_loss_prob": (), "train_on_input": (True, False),
}  # fmt: skip

LORA_TYPES = {  # kohya_ss's LoRA_type -> (network, whether its conv_dim acts, whether LyCORIS_preset acts)
    "Standard": ("lora", False, False), "Kohya LoCon": ("lora", True, False), "LoCon": ("lora", True, True),
    "LyCORIS/LoCon": ("lora", True, True), "LyCORIS/LoHa": ("loha", True, True), "LyCORIS/LoKr": ("lokr", True, True),
}  # fmt: skip
BLOCK_FIELDS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")  # kohya_ss's, as text
SAMPLERS = {"euler_a": "euler_a", "k_euler_a": "euler_a", "euler": "euler", "k_euler": "euler", "ddim": "ddim",
            "pndm": "pndm", "dpmsolver++": "dpmpp_2m"}  # fmt: skip


def _off(value: Any, offs: tuple[Any, ...]) -> bool:
    """Whether a GUI value means "off": unset ("", None, []) or one of `offs`, compared as the GUI's text would be."""
    if value in ("", None, []):
        return True
    text = str(value).strip().lower()
    return any(text == str(off).lower() or _same_number(text, off) for off in offs)


def _same_number(text: str, off: Any) -> bool:
    try:
        return not isinstance(off, bool) and float(text) == float(off)
    except (TypeError, ValueError):
        return False


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fp8(out: dict[str, Any]) -> None:
    """kohya's fp8_base (the UNet and the text encoders) and fp8_base_unet (the UNet only) are both this app's
    fp8_base, which narrows the UNet: the text encoders keep their precision (they usually leave the GPU once
    their outputs are cached)."""
    flags = [out.pop(key) for key in ("fp8_base", "fp8_base_unet") if key in out]
    if flags:  # a value that is not off goes on as given, so validation names one that is not a boolean
        out["fp8_base"] = next((flag for flag in flags if not _off(flag, (False,))), False)


def from_kohya_ss(data: dict[str, Any], keep_empty: set[str]) -> tuple[dict[str, Any], list[str]]:
    """kohya_ss's keys as sd-scripts' (flat, version 0), and the problems: what has no setting here. An empty value
    is the GUI's "unset" and goes, except under the names in `keep_empty` (the app's own top-level settings and the
    base model's path, whose emptiness the config reports rather than fills with a default)."""
    problems = []
    out = {k: v for k, v in data.items()
           if (k in keep_empty or v not in ("", None)) and k not in NO_EFFECT}  # fmt: skip
    for key, offs in OFF_VALUES.items():
        if key in out:
            value = out.pop(key)
            if not _off(value, offs):
                shown = ", ".join(repr(o) for o in offs) if offs else "empty"
                problems.append(f"kohya's `{key}` = {value!r} has no setting in this app; set it to {shown} or "
                                "remove it")  # fmt: skip
    _fp8(out)
    problems += _network(out)
    problems += _steps_and_rates(out)
    problems += _samples(out)
    _noise(out)
    for key in ("v2", "v_parameterization", "sdxl"):
        out.pop(key, None)
    if data.get("v_parameterization") is True:
        out["prediction_type"] = "v_prediction"
    if data.get("sdxl") is True:
        out["family"] = "sdxl"
    elif data.get("v2") is True:
        out["family"] = "sd2-v" if data.get("v_parameterization") is True else "sd2"
    if isinstance(out.get("optimizer"), str):
        out["optimizer_type"] = out.pop("optimizer")
    if "lora_network_weights" in out:
        out["network_weights"] = out.pop("lora_network_weights")
    if "max_resolution" in out:
        out["resolution"] = out.pop("max_resolution")
    cached = [out.pop(k) for k in ("sdxl_cache_text_encoder_outputs", "cache_text_encoder_outputs") if k in out]
    if any(value is True for value in cached):
        out["dataset.cache_text_embeddings"] = True
    return out, problems


def _network(out: dict[str, Any]) -> list[str]:
    """LoRA_type and what belongs to it: conv_dim only where it acts, the LyCORIS preset, LoKr's factor, DoRA."""
    kind = str(out.pop("LoRA_type", "Standard"))
    preset = out.pop("LyCORIS_preset", None)
    factor = out.pop("factor", None)
    dora = out.pop("dora_wd", False)
    if kind not in LORA_TYPES:
        return [f"kohya_ss's LoRA_type '{kind}' has no equivalent here; this app trains {', '.join(LORA_TYPES)}"]
    network, conv_acts, preset_acts = LORA_TYPES[kind]
    if preset_acts and str(preset) in ("attn-only", "attn-mlp"):
        conv_acts = False  # LyCORIS' presets without convs: its conv_dim has nothing to act on
    if not conv_acts:  # the GUI saves conv_dim for a plain LoRA too, which does not pass it to sd-scripts
        out.pop("conv_dim", None)
        out.pop("conv_alpha", None)
    if network != "lora":
        out["network_module"] = "lycoris.kohya"
        out.setdefault("network_args", []).append(f"algo={network}")  # the migration reads LyCORIS' algo
    args = out.setdefault("network_args", [])
    if isinstance(args, str):
        out["network_args"] = args = args.split()
    if preset_acts and preset:
        args.append(f"preset={preset}")
    for key in BLOCK_FIELDS:  # the GUI's own fields, which it hands sd-scripts in network_args
        value = out.pop(key, None)
        if str(value if value is not None else "").strip():
            args.append(f"{key}={str(value).strip()}")
    if network == "lokr" and factor is not None:
        args.append(f"factor={int(float(factor))}")
    if dora in (True, "true", "True"):
        if network != "lora" or kind == "Kohya LoCon":
            return [f"kohya_ss's dora_wd (DoRA) with LoRA_type '{kind}' has no equivalent here; DoRA trains with the "
                    "LoCon or Standard types"]  # fmt: skip
        args.append("use_dora=true")
    if not args:
        del out["network_args"]
    return []


def _steps_and_rates(out: dict[str, Any]) -> list[str]:
    """epoch, max_train_steps/epochs of 0 (unset), lr_warmup as a percentage of the steps, and rates of 0 (a part
    not trained)."""
    problems = []
    epoch = out.pop("epoch", None)
    for key in ("max_train_steps", "max_train_epochs"):
        if key in out and _number(out[key]) == 0:
            del out[key]  # kohya_ss: 0 means "work it out from the epochs"
    if epoch is not None and "max_train_epochs" not in out:
        out["max_train_epochs"] = epoch
    warmup = _number(out.pop("lr_warmup", 0)) or 0
    if warmup and not _number(out.get("lr_warmup_steps")):
        steps = _number(out.get("max_train_steps"))
        if steps:
            out["lr_warmup_steps"] = round(warmup * steps / 100)  # kohya_ss's own sum
        else:
            problems.append(f"kohya_ss's lr_warmup = {warmup:g}% of steps it counts from the dataset; give "
                            "max_train_steps, or set optimizer.lr_warmup_steps")  # fmt: skip
    # kohya_ss: a part's rate of 0 is "unset" while the other's is 0 too (learning_rate then trains both), else it
    # leaves that part untrained
    text_encoder, unet = _number(out.get("text_encoder_lr")), _number(out.get("unet_lr"))
    if text_encoder == 0 and not unet:
        out["text_encoder_lr"] = None  # None: learning_rate
        out.pop("unet_lr", None)
    elif text_encoder == 0:
        del out["text_encoder_lr"]
        out["network_train_unet_only"] = True
    elif unet == 0:
        problems.append("kohya_ss's unet_lr = 0 trains the text encoder alone, which this app does not; give the "
                        "UNet a rate")  # fmt: skip
    if "learning_rate" in out and _number(out["learning_rate"]) == 0 and unet:
        del out["learning_rate"]  # kohya_ss leaves it 0 when the per-part rates are set
    elif "learning_rate" in out and "text_encoder_lr" not in out:
        out["text_encoder_lr"] = None  # sd-scripts trains the text encoder at learning_rate unless told otherwise
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        if key in out and _number(out[key]) == 0:
            del out[key]
    return problems


def _samples(out: dict[str, Any]) -> list[str]:
    """kohya_ss keeps the prompt text itself in sample_prompts (sd-scripts: a file's path), one prompt a line."""
    problems = []
    prompts = out.pop("sample_prompts", None)
    if isinstance(prompts, str) and prompts.strip():
        lines = [line.strip() for line in prompts.splitlines() if line.strip() and not line.strip().startswith("#")]
        if len(lines) == 1 and lines[0].lower().endswith((".txt", ".toml", ".json")):
            problems.append(f"sample_prompts names the file {lines[0]!r}; put its prompts in sample.prompts, one a "
                            "line")  # fmt: skip
        else:
            out["sample.prompts"] = lines
    sampler = out.pop("sample_sampler", None)
    if sampler is not None:
        if str(sampler).lower() not in SAMPLERS:
            problems.append(f"kohya's sample_sampler '{sampler}' is not one here; use one of {', '.join(SAMPLERS)}")
        else:
            out["sample.sampler"] = SAMPLERS[str(sampler).lower()]
    return problems


def _noise(out: dict[str, Any]) -> None:
    """kohya_ss passes either the noise offset or the multi-resolution noise, as noise_offset_type says."""
    kind = out.pop("noise_offset_type", None)
    if kind is None:  # sd-scripts itself: both act as given
        return
    dropped = ("multires_noise_iterations", "multires_noise_discount") if kind == "Original" else ("noise_offset",)
    for key in dropped:
        out.pop(key, None)

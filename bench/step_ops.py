"""How many operations one bf16 training step of a full-size UNet dispatches, with the adapters taking their
input as it comes (the trainer under autocast: `lora.skip_input_casts`) and with peft's input casts.

    python bench/step_ops.py                                  # SD1.5's UNet, on the CPU
    python bench/step_ops.py --families sd1,sdxl --json bench/results/step_ops_cpu.json
    python bench/step_ops.py --device cuda                    # also counts the CUDA kernels launched

On a GPU a LoRA step at batch 1-4 is bound by kernel launches, not by arithmetic (issue 17's profile), so each
operation a step no longer dispatches is time saved there. The count is torch's profiler's over one forward and
backward of a batch of one under bf16 autocast, with random weights from the bundled configs and LoRA rank 16 on
the GPU bench's targets (`attn`) and kohya's default set (`attn-ff`). It does not depend on the resolution, so a
small latent is used; the result (the UNet's output and every gradient) is compared bit for bit between the two.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import publish  # noqa: E402

from lora_studio.config import LoraConfig  # noqa: E402
from lora_studio.lora import inject_lora, skip_input_casts  # noqa: E402
from lora_studio.paths import sd_config_dir  # noqa: E402


def random_unet(family: str, device: str):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        config = UNet2DConditionModel.load_config(sd_config_dir(family), subfolder="unet")
        unet = UNet2DConditionModel.from_config(config)
    return unet.to(torch.bfloat16)


def unet_inputs(unet, family: str, device: str) -> dict:
    generator = torch.Generator(device).manual_seed(1)
    config = unet.config
    inputs = dict(
        sample=torch.randn(1, config.in_channels, 8, 8, generator=generator, device=device, dtype=torch.bfloat16),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, 77, config.cross_attention_dim, generator=generator, device=device,
                                          dtype=torch.bfloat16),  # fmt: skip
    )
    if family == "sdxl":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 1280, generator=generator, device=device, dtype=torch.bfloat16),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]], device=device),
        }
    return inputs


def one_step(unet, inputs: dict, device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    unet.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = unet(**inputs).sample
    out.float().pow(2).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in unet.named_parameters() if p.grad is not None}
    return out.detach().clone(), grads


def counted(unet, inputs: dict, device: str) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiled:
        one_step(unet, inputs, device)
        if device == "cuda":
            torch.cuda.synchronize()
    events = profiled.events()
    counts = {
        "aten_ops": sum(1 for e in events if e.name.startswith("aten::")),
        "dtype_copies": sum(1 for e in events if e.name == "aten::_to_copy"),
    }
    if device == "cuda":
        counts["cuda_kernels"] = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return counts


def set_casts(layers: list, on: bool) -> None:
    for layer in layers:
        layer.cast_input_dtype_enabled = on


def case(family: str, targets: str, device: str) -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = random_unet(family, device)
    inject_lora(SimpleNamespace(unet=unet, family=family, text_encoders=[]),
                LoraConfig(rank=16, alpha=16.0, unet_targets=targets, train_text_encoder=False))  # fmt: skip
    for name, param in unet.named_parameters():
        if "lora_B" in name:  # a trained adapter, not peft's zero start, so the gradients are not trivially equal
            torch.nn.init.normal_(param, std=0.01)
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    inputs = unet_inputs(unet, family, device)
    skipped = skip_input_casts([unet])
    skipping = counted(unet, inputs, device)
    out_skip, grads_skip = one_step(unet, inputs, device)
    set_casts(layers, True)
    casting = counted(unet, inputs, device)
    out_cast, grads_cast = one_step(unet, inputs, device)
    same = torch.equal(out_skip, out_cast) and grads_skip.keys() == grads_cast.keys() and all(
        torch.equal(grads_skip[k], grads_cast[k]) for k in grads_skip
    )
    result = {"family": family, "targets": targets, "adapted_layers": len(layers), "skipped_layers": skipped,
              "peft_casts": casting, "skipped_casts": skipping, "bit_identical": same}  # fmt: skip
    result["fewer_aten_ops_pct"] = round(100 * (1 - skipping["aten_ops"] / casting["aten_ops"]), 1)
    if "cuda_kernels" in casting:
        result["fewer_cuda_kernels_pct"] = round(100 * (1 - skipping["cuda_kernels"] / casting["cuda_kernels"]), 1)
    print(result, flush=True)
    del unet
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="sd1")
    parser.add_argument("--targets", default="attn,attn-ff")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    cases = [case(family, targets, args.device) for family in args.families.split(",")
             for targets in args.targets.split(",")]  # fmt: skip
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "cases": cases}  # fmt: skip
    publish(report, args.json)


if __name__ == "__main__":
    main()

"""Commands that only read files answer without importing torch or diffusers (issue 17: under 2 s).

Whether a module was imported is what the test checks, not seconds: a loaded CI machine makes timings
flaky, and the 8 s these commands took were the imports (bench figures are in the README).
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lora_studio.lora_inspect import inspect_lora
from lora_studio.lora_read import load_lora

HEAVY = ("torch", "diffusers", "transformers", "peft", "safetensors.torch")


def imports_after(argv: list[str]) -> tuple[int, set[str], str]:
    """Run `lora-studio ARGV` in a fresh interpreter; its exit code, the heavy modules it imported, its output."""
    code = (
        "import sys, json\n"
        "from lora_studio.cli import main\n"
        f"rc = main({argv!r})\n"
        f"print(json.dumps([rc, [m for m in {HEAVY!r} if m in sys.modules]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    rc, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    return rc, set(heavy), done.stdout


def kohya_lora(path, dtype=torch.float32, alpha_dtype=None, metadata=None) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out_f, in_f, shape) in {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 768, ()),
        "lora_unet_down_blocks_0_resnets_0_conv1": (320, 320, (3, 3)),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768, ()),
    }.items():
        rank = 4 if shape else 8
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, *shape, generator=gen).to(dtype)
        up_shape = (out_f, rank, *((1, 1) if shape else ()))
        tensors[f"{name}.lora_up.weight"] = torch.randn(*up_shape, generator=gen).to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2 + 0.5, dtype=alpha_dtype or dtype)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "dtype, alpha_dtype",
    [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None), (torch.float16, torch.int64)],
)
def test_header_inspect_agrees_with_the_full_reader(tmp_path, dtype, alpha_dtype):
    path = tmp_path / "l.safetensors"
    kohya_lora(path, dtype, alpha_dtype)
    fast = inspect_lora(path)
    full = load_lora(path)
    expected = full.summary()
    assert {k: fast[k] for k in expected} == expected
    assert fast["family"] == "sd1" and fast["ranks"] == {"4": 1, "8": 2}
    if alpha_dtype is None:
        assert fast["alphas"] == {"2.5": 1, "4.5": 2}
    for name, m in full.modules.items():
        row = fast["per_module"][name]
        assert (row["rank"], row["alpha"], row["shape"]) == (m.rank, m.alpha, list(m.delta().shape))


def test_header_inspect_refuses_what_the_full_reader_refuses(tmp_path):
    path = tmp_path / "nan.safetensors"
    kohya_lora(path, torch.bfloat16)
    tensors = load_lora(path).state_dict()
    key = "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][3, 1] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(Exception, match="lora_up holds NaN or inf") as fast:
        inspect_lora(path)
    with pytest.raises(Exception, match="lora_up holds NaN or inf") as full:
        load_lora(path)
    assert str(fast.value) == str(full.value)


def test_other_formats_still_inspect_through_the_full_reader(tmp_path):
    path = tmp_path / "peft.safetensors"
    save_file({"base_model.model.down.0.to_q.lora_A.weight": torch.ones(2, 8),
               "base_model.model.down.0.to_q.lora_B.weight": torch.ones(8, 2)}, str(path))  # fmt: skip
    info = inspect_lora(path)
    assert info["format"] == "peft" and info["rank"] == 2 and info["per_module"]


def test_read_only_commands_import_neither_torch_nor_diffusers(tmp_path):
    lora = tmp_path / "lora.safetensors"
    kohya_lora(lora, torch.float16, metadata={"ss_base_model_version": "sd_v1"})
    rc, heavy, out = imports_after(["inspect", str(lora), "--json"])
    assert rc == 0 and json.loads(out[: out.rindex("\n[")])["family"] == "sd1"
    assert heavy == set()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text('name = "x"\n')
    for argv in (["detect", "demo"], ["config", "demo-cpu"], ["dataset", "demo", "--json"], ["presets"],
                 ["checkpoints", str(tmp_path / "run")]):  # fmt: skip
        rc, heavy, _ = imports_after(argv)
        assert rc == 0 and heavy == set(), (argv, heavy)

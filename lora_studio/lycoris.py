"""LyCORIS LoHa and LoKr layers: the tensors LyCORIS writes, the change they make to a layer's weight, and an exact
plain-LoRA equivalent (diffusers loads no LyCORIS file, so the preview and the tools work on that).

The key format is what A1111/Forge (`extensions-builtin/Lora/network_hada.py`, `network_lokr.py`) and ComfyUI
(`comfy/weight_adapter/loha.py`, `lokr.py`) read, after the kohya module name (`lora_unet_…`, `lora_te_…`):

- LoHa: `.hada_w1_a` [out, r], `.hada_w1_b` [r, in·kh·kw], `.hada_w2_a` [out, r], `.hada_w2_b` [r, in·kh·kw],
  `.alpha`; change = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r, with r = w1_b's rows (no alpha: scale 1).
  With LyCORIS' Tucker form, `.hada_t1`/`.hada_t2` [r, r, kh, kw] and w*_a [r, out], w*_b [r, in].
- LoKr: `.lokr_w1` [a, c] (or `.lokr_w1_a` [a, r] + `.lokr_w1_b` [r, c]) and `.lokr_w2` [b, d(, kh, kw)] (or
  `.lokr_w2_a` [b, r] + `.lokr_w2_b` [r, d·kh·kw], optionally with `.lokr_t2`), `.alpha`; change = kron(w1, w2) *
  scale, where scale = alpha / r for the rank r of a decomposed factor (w2_b's, else w1_b's) and 1 when neither
  factor is decomposed, whatever the alpha says. A 4-D w2 takes w1 as [a, c, 1, 1].
In both, the change is reshaped to the layer's weight; a conv's flattened input (in·kh·kw) is in weight order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .lora_inspect import LoraFileError, ModuleFacts

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ALGOS = {"loha": LOHA_KEYS, "lokr": LOKR_KEYS}
NETWORK_MODULE = "lycoris.kohya"  # ss_network_module of every LyCORIS file kohya's sd-scripts write
TUCKER = "i j k l, j r, i p -> p r k l"  # t [r, r, kh, kw], b [r, in], a [r, out] -> [out, in, kh, kw]
# Layers of the SD UNets with a 3x3 kernel (diffusers and SGM names), and 1x1 convs: for a LoHa/LoKr conv whose
# tensors are flat ([r, in·kh·kw]) when no base model is at hand to say its kernel.
KERNEL_3X3 = re.compile(r"(resnets_\d+_conv[12]|samplers_0_conv|conv_in|conv_out|in_layers_2|out_layers_3|_op"
                        r"|output_blocks_\d+_\d+_conv|input_blocks_0_0|_out_2)$")  # fmt: skip
KERNEL_1X1 = re.compile(r"(conv_shortcut|skip_connection)$")


def algo_of(suffixes) -> str | None:
    """loha / lokr for a module whose tensors carry those suffixes, None for anything else."""
    for algo, keys in ALGOS.items():
        if any(s in keys for s in suffixes):
            return algo
    return None


@dataclass
class LycorisModule:
    """One LoHa or LoKr layer as LyCORIS writes it: its tensors by key suffix, and its alpha (None: the file has
    none)."""

    algo: str  # "loha" or "lokr"
    tensors: dict[str, torch.Tensor]
    alpha: float | None

    @property
    def dim(self) -> int | None:
        """The rank alpha divides by: LoHa's w1_b rows; LoKr's decomposed factor's (w2 first), None if neither."""
        if self.algo == "loha":
            return self.tensors["hada_w1_b"].shape[0]
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in self.tensors:
                return self.tensors[key].shape[0]
        return None

    @property
    def rank(self) -> int:
        return self.dim or min(self.out_features, self.flat_in)

    @property
    def scale(self) -> float:
        return self.alpha / self.dim if self.alpha is not None and self.dim else 1.0

    @property
    def out_features(self) -> int:
        if self.algo == "loha":
            w1a = self.tensors["hada_w1_a"]
            return w1a.shape[1] if "hada_t1" in self.tensors else w1a.shape[0]
        return _rows(self.tensors, "lokr_w1") * _rows(self.tensors, "lokr_w2", tucker="lokr_t2")

    @property
    def flat_in(self) -> int:
        """The layer's input width times its kernel area (in·kh·kw)."""
        kernel = self.kernel
        area = kernel[0] * kernel[1] if kernel else 1
        if self.algo == "loha":
            return self.tensors["hada_w1_b"].shape[1] * area
        return _cols(self.tensors, "lokr_w1") * _cols(self.tensors, "lokr_w2") * area

    @property
    def kernel(self) -> tuple[int, int] | None:
        """The conv kernel when a tensor is 4-D (Tucker cores, a full conv w2); None when the tensors are flat."""
        for key in ("hada_t1", "lokr_t2", "lokr_w2"):
            t = self.tensors.get(key)
            if t is not None and t.dim() == 4:
                return (t.shape[2], t.shape[3])
        return None

    def delta(self) -> torch.Tensor:
        """The weight change at strength 1 (fp32): [out, in·kh·kw], or [out, in, kh, kw] when a tensor says so."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.algo == "loha":
            if "hada_t1" in t:
                product = (torch.einsum(TUCKER, t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
                           * torch.einsum(TUCKER, t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"]))  # fmt: skip
            else:
                product = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
            return product * self.scale
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum(TUCKER, t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1.contiguous(), w2.contiguous()) * self.scale  # kron refuses some strided inputs

    def facts(self) -> ModuleFacts:
        kernel = self.kernel
        down = (self.rank, self.flat_in // (kernel[0] * kernel[1]), *kernel) if kernel else (self.rank, self.flat_in)
        alpha = self.alpha if self.alpha is not None else float(self.rank)
        return ModuleFacts(down, (self.out_features, self.rank), alpha, False, self.algo)

    def state_dict(self, name: str, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The module's keys as LyCORIS writes them."""
        out = {f"{name}.{key}": t.detach().to("cpu", dtype or t.dtype).contiguous() for key, t in self.tensors.items()}
        if self.alpha is not None:
            some = next(iter(self.tensors.values()))
            out[f"{name}.alpha"] = torch.tensor(float(self.alpha), dtype=dtype or some.dtype)
        return out

    def as_lora(self, weight_shape: tuple[int, ...]):
        """A plain LoRA module whose change equals this one's exactly (to float rounding), shaped for a layer of
        `weight_shape`; alpha = its rank, so the scale is 1. LoHa and LoKr factor without an SVD: a Hadamard
        product of rank-r products is a product of rank r^2 (row-wise Khatri-Rao), and kron(A1 B1, A2 B2) =
        kron(A1, A2) @ kron(B1, B2); Tucker forms fall back to the SVD of the change."""
        from .lora_file import LoraModule

        up, down = self._factors()
        if up is None:  # the change, scale included
            up, down = svd_factors(self.delta().reshape(self.out_features, -1))
        else:
            up = up * self.scale
        up, down = up.float(), down.float()
        rank = down.shape[0]
        conv = len(weight_shape) == 4
        down = down.reshape(rank, *weight_shape[1:]) if conv else down
        up = up.reshape(*up.shape, 1, 1) if conv else up
        return LoraModule(down.contiguous(), up.contiguous(), float(rank))

    def _factors(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(up [out, R], down [R, in·kh·kw]) with up @ down = the unscaled change, or (None, None) for Tucker."""
        t = {k: v.double() for k, v in self.tensors.items()}
        if self.algo == "loha":
            if "hada_t1" in t:
                return None, None
            up = (t["hada_w1_a"][:, :, None] * t["hada_w2_a"][:, None, :]).flatten(1)
            down = (t["hada_w1_b"][:, None, :] * t["hada_w2_b"][None, :, :]).flatten(0, 1)
            return up.float(), down.float()
        if "lokr_t2" in t:
            return None, None
        a1, b1 = (t["lokr_w1_a"], t["lokr_w1_b"]) if "lokr_w1" not in t else svd_factors(t["lokr_w1"])
        a2, b2 = (t["lokr_w2_a"], t["lokr_w2_b"]) if "lokr_w2" not in t else svd_factors(t["lokr_w2"].flatten(1))
        a1, b1, a2, b2 = (m.contiguous() for m in (a1, b1, a2, b2))
        return torch.kron(a1, a2).float(), torch.kron(b1, b2).float()


def svd_factors(matrix: torch.Tensor, tolerance: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) with up @ down = `matrix`, keeping the singular values above `tolerance` of the largest (at
    least one, so an all-zero change stays a valid, zero module)."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    keep = max(1, int((s > s[0] * tolerance).sum())) if s.numel() and s[0] > 0 else 1
    root = s[:keep].sqrt()
    return u[:, :keep] * root, root[:, None] * vh[:keep]


def _rows(t: dict[str, torch.Tensor], key: str, tucker: str | None = None) -> int:
    if key in t:
        return t[key].shape[0]
    return t[f"{key}_a"].shape[1] if tucker and tucker in t else t[f"{key}_a"].shape[0]


def _cols(t: dict[str, torch.Tensor], key: str) -> int:
    return t[key].shape[1] if key in t else t[f"{key}_b"].shape[1]


REQUIRED = {
    "loha": (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)),
    "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w1", "lokr_w1_b"), ("lokr_w2", "lokr_w2_a"), ("lokr_w2", "lokr_w2_b")),
}


def read_module(name: str, algo: str, tensors: dict[str, torch.Tensor], alpha: float | None, source) -> LycorisModule:
    """One module from a file's tensors (suffix -> tensor), checked: every factor there, shapes that multiply,
    finite values."""
    for options in REQUIRED[algo]:
        if not any(key in tensors for key in options):
            raise LoraFileError(f"{source}: {algo} module {name} has no {' or '.join(options)} tensor; "
                                "the file is incomplete.")  # fmt: skip
    if algo == "loha" and ("hada_t1" in tensors) != ("hada_t2" in tensors):
        raise LoraFileError(f"{source}: loha module {name} has only one of hada_t1/hada_t2; the file is damaged.")
    module = LycorisModule(algo, tensors, alpha)
    try:
        delta = module.delta()
        if delta.shape[0] != module.out_features:
            raise RuntimeError(f"change has {delta.shape[0]} rows, not {module.out_features}")
    except (RuntimeError, IndexError, KeyError) as exc:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(tensors.items()))
        raise LoraFileError(f"{source}: {algo} module {name} has tensors whose shapes do not multiply ({shapes}: "
                            f"{str(exc)[:120]}); the file is damaged or was edited.") from None  # fmt: skip
    for key, t in tensors.items():
        if not torch.isfinite(t.float()).all():
            raise LoraFileError(f"{source}: module {name}'s {key} holds NaN or inf values; the training that made "
                                "it diverged, so use an earlier checkpoint.")  # fmt: skip
    return module


def guessed_weight_shape(name: str, module: LycorisModule, family: str | None) -> tuple[int, ...]:
    """The adapted layer's weight shape when no base model is at hand: flat tensors do not say a conv's kernel,
    but the layer's name does in the SD UNets (3x3 resnet and sampler convs; 1x1 shortcuts and, in SD 1.x, the
    transformer's proj_in/proj_out)."""
    out, flat = module.out_features, module.flat_in
    kernel = module.kernel
    if kernel:
        return (out, flat // (kernel[0] * kernel[1]), *kernel)
    if KERNEL_3X3.search(name) and flat % 9 == 0:
        return (out, flat // 9, 3, 3)
    one_by_one = KERNEL_1X1.search(name) or (family == "sd1" and name.endswith(("proj_in", "proj_out")))
    return (out, flat, 1, 1) if one_by_one and name.startswith("lora_unet_") else (out, flat)


def network_args(algo: str, factor: int) -> dict[str, str]:
    """What kohya's `--network_args` for LyCORIS would hold (`algo`, and LoKr's `factor`), as strings."""
    args = {"algo": algo}
    if algo == "lokr":
        args["factor"] = str(factor)
    return args


def from_peft_layer(layer, adapter: str) -> LycorisModule:
    """A trained peft LoHa/LoKr layer as LyCORIS writes it. peft scales LoKr by alpha / r even when no factor is
    decomposed, where every consumer uses 1: there the scale goes into lokr_w1 and alpha is written as r (what
    LyCORIS itself writes then)."""
    algo = "loha" if hasattr(layer, "hada_w1_a") else "lokr"
    tensors = {}
    for key in ALGOS[algo]:
        store = getattr(layer, key)
        if adapter in store:
            tensors[key] = store[adapter].detach()
    rank, alpha = layer.r[adapter], float(layer.alpha[adapter])
    module = LycorisModule(algo, tensors, alpha)
    if algo == "lokr" and module.dim is None:
        tensors["lokr_w1"] = tensors["lokr_w1"] * (alpha / rank)
        module.alpha = float(rank)
    if not math.isclose(layer.scaling[adapter], alpha / rank, rel_tol=1e-6):  # peft's rule; guard a change in it
        raise LoraFileError(f"peft scales this {algo} layer by {layer.scaling[adapter]}, not alpha / r; the file "
                            "would not match what was trained.")  # fmt: skip
    return module

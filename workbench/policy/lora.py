"""LoRA adapters on the policy (``RunConfig.lora``; the optional ``peft`` extra).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
freezes every base weight ``W`` [out, in] of the targeted linear layers and trains a low-rank
update instead: the layer computes ``W x + (alpha / r) * B (A dropout(x))`` with ``A`` [r, in]
(random init) and ``B`` [out, r] (zeros), so the adapted model starts as the base model exactly.

- ``validate_lora`` checks ``RunConfig.lora`` (keys ``r``, ``alpha``, ``dropout``, ``target``) and
  that peft is installed, and fills the defaults; ``{}`` means off.
- ``apply_lora`` wraps a model with peft (``get_peft_model``): only the adapters keep
  ``requires_grad``, so ``build_optimizer`` hands AdamW only them. A target is a comma-separated list
  of module-name suffixes (``q_proj,v_proj``) or ``all-linear``; each suffix must match a linear
  layer, else a one-line error listing the layer names the model has. The output layer
  (``lm_head``, tied to the input embedding in the built-in model) is never a target.
- ``AdapterOffReference``: the reference policy of a LoRA run is the same model with its adapters
  switched off (peft's ``disable_adapter()``) = the frozen base = the initial policy; no copy.
- ``merged_state_dict`` / ``plain_policy``: the weights an engine that keeps its own copy (vLLM)
  needs, with the adapters merged (``W + (alpha / r) B A``) under the base model's tensor names;
  the training model is never changed.

Checkpoints hold the peft model's full state dict (base and adapter tensors) in
``model.safetensors``, so a resume restores exactly what it saved (``runs/checkpoint.py``). With
``dropout`` > 0 the adapters' dropout masks come from torch's global RNG, which checkpoints do not
hold: such a resumed run is not bit-identical to the uninterrupted one.

Left out: LoRA on embeddings or convolutions, several adapters at once, rsLoRA / DoRA variants,
quantised base weights (QLoRA).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import sys
import warnings
from typing import Any

import torch

from workbench.errors import WorkbenchError, bad_value, short_repr

INSTALL_HINT = "pip install 'workbench[peft]'"
DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target": "q_proj,v_proj"}
"""``RunConfig.lora`` keys and their defaults (the scale of the update is alpha / r)."""
ALL_LINEAR = "all-linear"
ADAPTER = "default"  # peft's name for the one adapter a model gets


def peft_available() -> bool:
    """True when the ``peft`` package can be imported (found on the path; not imported here)."""
    return importlib.util.find_spec("peft") is not None


def validate_lora(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` merged over ``DEFAULTS`` ({} stays {}: off); one-line errors naming the key."""
    if not params:
        return {}
    unknown = sorted(set(params) - set(DEFAULTS), key=str)
    if unknown:
        raise WorkbenchError(f"lora key {unknown[0]!r} is unknown: valid keys are {', '.join(DEFAULTS)}")
    out = {**DEFAULTS, **params}
    r, alpha, dropout, target = out["r"], out["alpha"], out["dropout"], out["target"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise bad_value("lora.r", r, "an integer >= 1 (the adapters' rank)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0 < alpha < math.inf):
        raise bad_value("lora.alpha", alpha, "a finite number > 0 (the update is scaled by alpha / r)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0 <= dropout < 1):
        raise bad_value("lora.dropout", dropout, "a number in [0, 1)")
    names = [t.strip() for t in target.split(",")] if isinstance(target, str) else []
    if not names or not all(names) or any(" " in t for t in names) or (ALL_LINEAR in names and len(names) > 1):
        raise bad_value("lora.target", target, f"comma-separated module-name suffixes (e.g. q_proj,v_proj) "
                                               f"or {ALL_LINEAR}")
    if not peft_available():
        raise WorkbenchError(f"lora={short_repr(params)} needs peft, which is not installed: {INSTALL_HINT}")
    return {"r": r, "alpha": float(alpha), "dropout": float(dropout), "target": ",".join(names)}


def is_lora(model: Any) -> bool:
    """True for a peft-wrapped model (a model can only be one if peft was imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def target_modules(model: torch.nn.Module, target: str) -> list[str]:
    """Full names of the linear layers ``target`` selects (see the module docstring), in model order."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not output]
    if target == ALL_LINEAR:
        if not linear:
            raise WorkbenchError(f"lora.target={ALL_LINEAR!r} matches no linear layer of the model")
        return linear
    suffixes = target.split(",")
    for suffix in suffixes:
        if not any(name == suffix or name.endswith("." + suffix) for name in linear):
            have = sorted({name.rsplit(".", 1)[-1] for name in linear})
            raise WorkbenchError(f"lora.target={suffix!r} matches no linear layer of the model: expected one of "
                                 f"{', '.join(have) or '(none)'} or {ALL_LINEAR} (the output layer is never a target)")
    return [name for name in linear if any(name == s or name.endswith("." + s) for s in suffixes)]


def apply_lora(model: torch.nn.Module, params: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """``model`` with LoRA adapters (``params``: a ``validate_lora`` dict); peft injects the adapter
    layers into ``model`` itself. ``A`` is initialised from ``seed`` on a private RNG state, so the
    same (model, params, seed) gives the same adapters and the caller's global RNG is untouched."""
    params = validate_lora(params)
    if not params:
        raise WorkbenchError("apply_lora lora={} is invalid: expected at least one key (r, alpha, dropout, target)")
    names = target_modules(model, params["target"])
    peft = importlib.import_module("peft")
    config = peft.LoraConfig(r=params["r"], lora_alpha=params["alpha"], lora_dropout=params["dropout"],
                             target_modules=names, bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers for a renamed attribute; the FutureWarning is theirs to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        wrapped = peft.get_peft_model(model, config)
    return wrapped


class AdapterOffReference:
    """The reference policy of a LoRA run: ``model`` called with its adapters disabled, no grad.

    It holds no parameters of its own (``parameters()`` are the model's): KL penalties and
    reference log-probs cost one forward of the shared weights and no second copy of them.
    ``eval()`` / ``train()`` / ``training`` act on the shared model (``frozen_logprobs`` restores
    the mode it found).
    """

    def __init__(self, model: torch.nn.Module):
        if not is_lora(model):
            raise WorkbenchError(f"AdapterOffReference model={type(model).__name__} is invalid: expected a peft "
                                 f"model (apply_lora)")
        self.model = model

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self) -> "AdapterOffReference":
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> "AdapterOffReference":
        self.model.train(mode)
        return self

    def parameters(self):
        return self.model.parameters()

    def __call__(self, *args: Any, **kwargs: Any):
        with torch.no_grad(), self.model.disable_adapter():
            return self.model(*args, **kwargs)


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The adapted layers of a peft model, by their name in the base model."""
    lora = importlib.import_module("peft.tuners.lora")
    return {name: m for name, m in model.get_base_model().named_modules() if isinstance(m, lora.LoraLayer)}


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict an engine loads: for a plain model its own (detached); for a LoRA model the
    base model's tensor names with each adapted weight replaced by ``W + (alpha / r) * B @ A``
    (new tensors, computed in fp32 and cast back to W's dtype) and no adapter tensors."""
    if not is_lora(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    layers = lora_layers(model)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.get_base_model().state_dict().items():
        owner = next((name for name in layers if key.startswith(name + ".")), None)
        if owner is None:
            out[key] = value.detach()
            continue
        rest = key[len(owner) + 1:]
        if not rest.startswith("base_layer."):
            continue  # lora_A / lora_B / dropout: folded into the weight below
        out[f"{owner}.{rest.removeprefix('base_layer.')}"] = value.detach()
    for name, layer in layers.items():
        if ADAPTER not in layer.lora_A or layer.merged:  # merged: the base weight already holds the update
            continue
        w = out[f"{name}.weight"]  # [out, in]
        a = layer.lora_A[ADAPTER].weight.float()  # [r, in]
        b = layer.lora_B[ADAPTER].weight.float()  # [out, r]
        out[f"{name}.weight"] = (w.float() + layer.scaling[ADAPTER] * (b @ a)).to(w.dtype)  # [out, in]
    return out


def plain_policy(model: torch.nn.Module) -> torch.nn.Module:
    """A model ``save_policy`` can write as an ordinary checkpoint: ``model`` itself when it has no
    adapters, else a merged copy (peft's ``merge_and_unload`` on a deep copy; the training model and
    its adapters are left as they are). Costs one more copy of the weights while it lives."""
    if not is_lora(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


__all__ = ["ALL_LINEAR", "DEFAULTS", "INSTALL_HINT", "AdapterOffReference", "apply_lora", "is_lora", "lora_layers",
           "merged_state_dict", "peft_available", "plain_policy", "target_modules", "validate_lora"]

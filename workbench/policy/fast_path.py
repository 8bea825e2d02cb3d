"""The trainer's fast path: autocast (bf16 / fp16) and ``torch.compile`` of the training forward.

``RunConfig.autocast`` runs every trainer forward (the policy's, with or without a graph, the
proximal, reference and log pi_gen ones) under ``torch.autocast``: matmuls in the low-precision
dtype, everything from the logits on in fp32 (``policy.logprobs`` casts the logits to float32
before the log-softmax, and ``steps.update`` builds the loss outside the autocast region). The
sampler keeps the model's own dtype, so with a fp32 sampler and a bf16 trainer the two programs
holding the same weights differ: bf16 autocast IS an engine-mismatch source, and it shows in
``mismatch/engine_*`` (``steps.reweight.mismatch``: log pi_gen - log mu), never in drift. Mixed
precision training as in Micikevicius et al. (2018), "Mixed Precision Training", arXiv:1710.03740;
bf16 as in Kalamkar et al. (2019), "A Study of BFLOAT16 for Deep Learning Training",
arXiv:1905.12322. fp16 has no loss scaling here (left out): a step whose gradient overflows is
skipped by the update's non-finite check, an underflow is silent; prefer bf16.

``RunConfig.compile`` compiles the policy's training forward once per model object
(``training_model``; ``torch.compile(dynamic=True)``, TorchInductor's C++ backend on CPU, so a new
batch length or batch size does not recompile) and caches it on the model. The no-grad forwards
(proximal, log pi_gen, reference, sampling, evaluation) stay eager: inductor may reorder
reductions, so compiled and eager log-probs differ by float rounding (~1e-6), which then appears
in ``mismatch/drift_*`` at staleness > 0. Measured in ``bench/fast_path.py`` (README, "Benchmarks").
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import warnings

import torch

from workbench.errors import WorkbenchError, bad_value
from workbench.policy.model import resolve_device

AUTOCAST_MODES = ("", "bf16", "fp16")
"""``RunConfig.autocast`` values: '' = exact (the model's dtype), bf16, fp16."""
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CXX_CANDIDATES = ("g++", "c++", "clang++")
"""C++ compilers TorchInductor's CPU backend can build its kernels with (``$CXX`` first)."""


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would find: ``$CXX`` if it resolves, else the first on PATH."""
    for name in ((os.environ.get("CXX") or "").strip(), *CXX_CANDIDATES):
        if name and shutil.which(name):
            return name
    return None


def _autocast_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this torch build runs a matmul under ``torch.autocast(device_type, dtype)``."""
    try:
        with torch.autocast(device_type, dtype=dtype):
            probe = torch.ones(2, 2, device=device_type) @ torch.ones(2, 2, device=device_type)  # [2, 2]
        return probe.dtype == dtype
    except (RuntimeError, TypeError, ValueError, AssertionError):
        return False


def check_fast_path(compile: bool, autocast: str, device: str) -> None:
    """One-line ``WorkbenchError`` if ``compile`` / ``autocast`` cannot run on ``device`` (``Run``
    calls it before building anything or opening its directory)."""
    if autocast not in AUTOCAST_MODES:
        raise bad_value("autocast", autocast, "'' (exact) | bf16 | fp16")
    if autocast:
        device_type = torch.device(resolve_device(device)).type
        if not _autocast_works(device_type, AUTOCAST_DTYPES[autocast]):
            raise WorkbenchError(f"autocast={autocast!r} is unsupported on {device_type} by this torch "
                                 f"({torch.__version__}): use '' or bf16")
    if compile:
        if importlib.util.find_spec("torch._inductor") is None or not torch._dynamo.is_dynamo_supported():
            raise WorkbenchError(f"compile=True is unsupported: this torch ({torch.__version__}) has no working "
                                 "torch.compile / inductor; use compile=False")
        if torch.device(resolve_device(device)).type == "cpu" and cxx_compiler() is None:
            raise WorkbenchError("compile=True is unsupported here: inductor's CPU backend needs a C++ compiler "
                                 f"and none of $CXX, {', '.join(CXX_CANDIDATES)} is on PATH; install one or use compile=False")


def autocast_context(autocast: str, model: torch.nn.Module):
    """``torch.autocast`` on the model's device in ``autocast``'s dtype; a no-op for ''."""
    if not autocast:
        return contextlib.nullcontext()
    if autocast not in AUTOCAST_DTYPES:
        raise bad_value("autocast", autocast, "'' (exact) | bf16 | fp16")
    return torch.autocast(next(model.parameters()).device.type, dtype=AUTOCAST_DTYPES[autocast])


class _CompiledForward:
    """Holds a model's compiled module. Not a ``Module`` (never in ``state_dict`` or ``parameters``);
    a deep copy of the model (a frozen reference, a branch) starts empty and compiles for itself."""

    def __init__(self) -> None:
        self.module: torch.nn.Module | None = None

    def __deepcopy__(self, memo: dict) -> "_CompiledForward":
        return _CompiledForward()


CACHE_ATTR = "_workbench_compiled_forward"


def training_model(model: torch.nn.Module, compile: bool) -> tuple[torch.nn.Module, bool]:
    """The module to call for the training forward, and whether this call creates it (its first
    forward/backward then compiles: ``perf/compile_seconds``). ``compile`` False: ``model`` itself.

    The compiled module shares ``model``'s parameters (the optimizer's), so nothing else changes.
    """
    if not compile:
        return model, False
    holder = model.__dict__.get(CACHE_ATTR)
    if holder is None:
        holder = _CompiledForward()
        model.__dict__[CACHE_ATTR] = holder  # a plain attribute: nn.Module registers only Modules
    if holder.module is not None:
        return holder.module, False
    with warnings.catch_warnings():  # inductor's own imports use torch.jit APIs torch itself deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        holder.module = torch.compile(model, dynamic=True)  # dynamic: batch size / length never recompile
    return holder.module, True


__all__ = ["AUTOCAST_MODES", "autocast_context", "check_fast_path", "cxx_compiler", "training_model"]

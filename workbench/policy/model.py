"""The built-in tiny causal LM and loading/saving of any local Hugging Face checkpoint.

``build_model`` makes a ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` (Llama: Touvron et al. 2023;
Qwen2: Yang et al. 2024) from its config class, sized by ``ModelConfig`` and the tokenizer's
vocabulary, fp32, dropout 0, initialised deterministically from a seed. ``load_policy`` opens any
local checkpoint folder (model + tokenizer) with ``local_files_only=True``; the built-in model is
saved with ``save_policy`` and reloaded through that same path.

Attention runs with ``ATTN_IMPLEMENTATION`` ("sdpa"): on a 1-thread CPU with the default model it
measured slightly faster than "eager" (sampling 256 sequences: 71 vs 77 ms; forward + backward on
256 x 13 tokens: 177 vs 182 ms), and both are deterministic on CPU.

``load_policy(path, dtype=..., device=...)`` takes the trainer's dtype (float32 default; bfloat16 /
float16 halve memory) and device (``resolve_device("auto")`` = CUDA when present, else CPU).

Left out: quantisation, multi-device placement, sharded or remote loading.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from workbench.errors import WorkbenchError, bad_value

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
# transformers is imported by the functions that build, load or save a model: importing it costs
# ~2 s of a ~5 s ``import workbench.config`` (python -X importtime), which the CLI's --help, the
# registries and the config checks do not need.

ATTN_IMPLEMENTATION = "sdpa"
ARCH_NAMES = ("llama", "qwen2")
"""The architectures ``ModelConfig.arch`` takes; ``ARCHS`` maps each to its (config, model) classes."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
"""Weight files that only load by unpickling (running code from the file); ``load_policy`` refuses them."""
TINY_MODEL: dict[str, int] = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                                  max_position_embeddings=64)
"""``ModelConfig(**TINY_MODEL)``: a ~35 k-parameter untrained model for tests, CI-sized notebooks and
sweep tests (seconds per run; it learns nothing useful)."""


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; ``cuda`` without one is an error."""
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise bad_value("device", device, " | ".join(DEVICES) + " | cuda:N")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not torch.cuda.is_available():
        raise WorkbenchError(f"device={device!r} is invalid here: torch sees no CUDA device (use auto or cpu)")
    return device


@dataclass(frozen=True)
class ModelConfig:
    """Size and shape of the built-in model (defaults: 1.7 M parameters with the default tokenizer).

    The default size was chosen by measurement on 2 CPU cores (README, "Choosing the default"):
    0.5 M parameters (hidden 128) gained only ~10 points of held-out accuracy in 300 GRPO updates
    at any stable learning rate (>= 5e-4 collapsed); hidden 256 gains 25-30 points in the same
    updates for about 0.4 s per update.
    """

    arch: str = "llama"
    """Architecture: "llama" (no attention bias) or "qwen2" (q/k/v bias)."""
    hidden_size: int = 256
    """Width of the residual stream; must be divisible by ``num_heads``."""
    num_layers: int = 2
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention (query) heads; head size = hidden_size / num_heads."""
    num_kv_heads: int = 4
    """Key/value heads (grouped-query attention when < num_heads); must divide ``num_heads``."""
    intermediate_size: int = 768
    """Hidden width of the SwiGLU MLP."""
    max_position_embeddings: int = 64
    """Longest prompt + response the model is meant for (RoPE; longer still runs but is untrained)."""
    tie_embeddings: bool = True
    """Share the input embedding and the output (LM head) matrix."""

    def __post_init__(self) -> None:
        if self.arch not in ARCH_NAMES:
            raise bad_value("ModelConfig.arch", self.arch, f"one of {', '.join(ARCH_NAMES)}")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad_value(f"ModelConfig.{name}", v, "a positive int")
        if self.hidden_size % self.num_heads:
            raise bad_value("ModelConfig.num_heads", self.num_heads,
                            f"a divisor of hidden_size={self.hidden_size}")
        if (self.hidden_size // self.num_heads) % 2:
            raise bad_value("ModelConfig.num_heads", self.num_heads,
                            f"a value giving an even head size (RoPE) for hidden_size={self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            raise bad_value("ModelConfig.num_kv_heads", self.num_kv_heads,
                            f"a divisor of num_heads={self.num_heads}")
        if not isinstance(self.tie_embeddings, bool):
            raise bad_value("ModelConfig.tie_embeddings", self.tie_embeddings, "True or False")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> PreTrainedModel:
    """A freshly initialised fp32 causal LM; the same (cfg, tokenizer, seed) gives the same weights."""
    config_cls, model_cls = _archs()[cfg.arch]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hf_cfg = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=0.0,
        pad_token_id=pad,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
        use_cache=True,
    )
    hf_cfg._attn_implementation = ATTN_IMPLEMENTATION
    # Initialise on a private RNG state so the caller's global torch RNG is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(hf_cfg)
    model.to(torch.float32)
    model.generation_config.pad_token_id = pad
    return model


def _archs() -> dict[str, tuple[type, type]]:
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    return {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def __getattr__(name: str) -> Any:
    """``ARCHS`` (name -> (config class, model class)) is made on first use: it imports transformers."""
    if name == "ARCHS":
        return _archs()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (tied matrices counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@contextlib.contextmanager
def _quiet_progress():
    """Hide transformers' per-call "Loading weights" / "Writing shards" bars (noise in notebooks)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _missing(path: Path) -> str | None:
    if not path.exists():
        return "the folder does not exist"
    if not path.is_dir():
        return "it is not a folder"
    if not (path / "config.json").is_file():
        return "no config.json (model config) in the folder"
    if not any(path.glob("*.safetensors")):
        pickled = sorted(f.name for pattern in PICKLED_WEIGHTS for f in path.glob(pattern) if f.is_file())
        if pickled:
            return (f"its weights are pickled ({', '.join(pickled[:3])}) and workbench never unpickles: if you "
                    "trust the folder, convert it once with python -c \"from transformers import AutoModelForCausalLM "
                    f"as M, AutoTokenizer as T; d, o = {str(path)!r}, {str(path) + '-safetensors'!r}; "
                    "M.from_pretrained(d).save_pretrained(o, safe_serialization=True); "
                    "T.from_pretrained(d).save_pretrained(o)\" and pass the new folder")
        return "no *.safetensors weights in the folder"
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return f"no tokenizer files (one of {', '.join(TOKENIZER_FILES)}) in the folder"
    return None


def load_policy(path: str | os.PathLike, dtype: str = "float32",
                device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Open a local Hugging Face checkpoint folder (model + tokenizer), by default fp32 on CPU.

    ``dtype``: float32 | bfloat16 | float16; ``device``: cpu | cuda | cuda:N | auto (CUDA when
    present). Nothing is downloaded and nothing is unpickled: the weights must be safetensors
    (a folder with only ``pytorch_model.bin`` / ``*.pt`` is refused with the command that converts
    it). A tokenizer without a pad token gets EOS as pad.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise bad_value("dtype", dtype, " | ".join(DTYPES))
    device = resolve_device(device)
    path = Path(path).expanduser()
    problem = _missing(path)
    if problem:
        raise WorkbenchError(f"load_policy path={str(path)!r} is invalid: {problem}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised as a one-line user error
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WorkbenchError(f"load_policy path={str(path)!r}: cannot load the tokenizer ({msg})") from e
    if tokenizer.eos_token_id is None:
        raise WorkbenchError(f"load_policy path={str(path)!r}: the tokenizer has no EOS token; "
                             "set eos_token in tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        with _quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(
                path, local_files_only=True, dtype=DTYPES[dtype], attn_implementation=ATTN_IMPLEMENTATION,
                use_safetensors=True,
            )
        if device != "cpu":
            model.to(device)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WorkbenchError(f"load_policy path={str(path)!r}: cannot load the model ({msg})") from e
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_policy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | os.PathLike) -> Path:
    """Write model (safetensors) + tokenizer to ``path`` atomically; replaces an existing folder.

    Files go to a temporary sibling folder first, which is renamed into place, so a crash never
    leaves a half-written checkpoint at ``path``.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        with _quiet_progress():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


__all__ = ["ATTN_IMPLEMENTATION", "DTYPES", "DEVICES", "ModelConfig", "resolve_device", "build_model", "count_parameters",
           "load_policy", "save_policy"]

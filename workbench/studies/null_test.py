"""The null test: updates at lr = 0, where every clipped or masked token is numerics, not learning.

With the learning rate at 0 the policy never moves (AdamW's step is exactly 0 * update), so on an
on-policy batch pi_theta / mu would be 1 on every token in exact arithmetic: whatever the objective
clips, masks or truncates is the sampler/trainer numerical mismatch alone. Users run this check to
find that their trust region is spent on numerics: ~4.6% of tokens outside the clip band at lr = 0
(RLinf PR #1534), 8.0% of tokens outside [0.9, 1.1] from a bf16 trainer's chunking alone, and top-k
50 leaving ~17% of the gradient (TRL issue #6789). ``run_null_test`` repeats ``updates`` generate ->
score -> update steps of a config at lr = 0 under each numerics setting (``SETTINGS``: the knobs of
``workbench.policy.numerics``) from the same seed, so every setting sees the same prompts, and reports
per setting: the share of tokens whose ratio leaves the objective's clip band [1 - clip_low,
1 + clip_high] (``eps_low`` / ``eps_high`` where the objective names them so; 0.2 each otherwise),
the share outside [0.9, 1.1], the objective's own ``offpolicy/clipfrac`` / ``offpolicy/masked_frac``
and ``correction/truncated_frac`` (clips that bind, given the advantage sign) from the update's
metrics row, and quantiles of |log ratio|. The ratio is the one the objective clips: pi_theta / mu,
or pi_theta / pi_prox with a proximal policy.

Every batch is consumed at once (staleness 0: with lr = 0 every policy is the same, so a lag would
change only which batches are drawn). The pooled per-token log-ratios of each setting feed the
sequence-weight table (``workbench.studies.sequence_weights``). On CPU in fp32 the exact setting
clips nothing (the KV-cache decode and the full forward differ by float rounding, ~1e-7).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import polars as pl
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.policy.chat import render_examples
from workbench.policy.fast_path import check_fast_path
from workbench.policy.numerics import trainer_numerics
from workbench.steps.prefill import sampling_params
from workbench.steps.score import score
from workbench.steps.update import build_optimizer, expert_batch, update_step

NOISE = 0.1
"""Default std of the injected logit noise of the ``*_noise`` settings (nats): on the built-in model it
gives per-token log ratios of std ~0.056 with ~10% of tokens outside [0.9, 1.1], the size TRL issue
#6789 measured for a bf16 trainer whose chunking changes (std 0.055, 8.0%)."""
_EXACT = {"sampler_logits_dtype": "", "trainer_logits_dtype": "", "sampler_logit_noise": 0.0,
          "trainer_logit_noise": 0.0, "autocast": ""}
SETTINGS: dict[str, Callable[[float], dict[str, Any]]] = {
    "config": lambda noise: {},
    "exact": lambda noise: dict(_EXACT),
    "sampler_bf16": lambda noise: {**_EXACT, "sampler_logits_dtype": "bf16"},
    "trainer_bf16": lambda noise: {**_EXACT, "trainer_logits_dtype": "bf16"},
    "bf16": lambda noise: {**_EXACT, "sampler_logits_dtype": "bf16", "trainer_logits_dtype": "bf16"},
    "sampler_noise": lambda noise: {**_EXACT, "sampler_logit_noise": noise},
    "trainer_noise": lambda noise: {**_EXACT, "trainer_logit_noise": noise},
    "autocast_bf16": lambda noise: {**_EXACT, "autocast": "bf16"},
    "replay": lambda noise: {**_EXACT, "replay_sampling_mask": True},
    "no_replay": lambda noise: {**_EXACT, "replay_sampling_mask": False},
}
"""Named numerics settings: the ``RunConfig`` fields each sets over the config (``config``: none)."""
QUANTILES = (0.5, 0.9, 0.99)
"""Quantiles of |log ratio| in the table."""


@dataclass
class NullTestResult:
    """What ``run_null_test`` measured."""

    table: pl.DataFrame
    """One row per setting (the columns of ``format_null_table``)."""
    log_ratios: dict[str, torch.Tensor]
    """Per setting, every valid token's log ratio, pooled over the updates [N] float64."""
    batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
    """Per setting, (log ratio [B, T], response mask [B, T]) of each update's batch."""
    weights_unchanged: bool
    """Whether every parameter is bit-identical after all the updates (lr = 0 really is a no-op)."""


def default_settings(config: RunConfig) -> list[str]:
    """``config`` first when it sets any numerics knob, then exact, the bf16 and noise injections, and
    the replay pair when the config samples with top-k / top-p."""
    out = ["config"] if any(getattr(config, k) != v for k, v in _EXACT.items()) or config.replay_sampling_mask else []
    out += ["exact", "sampler_bf16", "trainer_bf16", "autocast_bf16", "trainer_noise"]
    if config.top_p < 1.0 or config.top_k > 0:
        out += ["no_replay", "replay"]
    return out


def check_settings(names: Sequence[str]) -> list[str]:
    """``names`` if each is a key of ``SETTINGS`` (and there is at least one), else a one-line error."""
    names = list(names)
    if not names:
        raise WorkbenchError(f"settings=[] is invalid: expected one or more of {', '.join(SETTINGS)}")
    for n in names:
        if n not in SETTINGS:
            raise WorkbenchError(f"setting={n!r} is invalid: expected one of {', '.join(SETTINGS)}")
    return names


def _band(params: dict[str, Any]) -> tuple[float, float]:
    """The objective's clip band [1 - low, 1 + high] (0.2 each when it has no clip parameters)."""
    low = params.get("clip_low", params.get("eps_low", 0.2))
    high = params.get("clip_high", params.get("eps_high", 0.2))
    return 1.0 - float(low), 1.0 + float(high)


def _snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def run_null_test(config: RunConfig, settings: Sequence[str] | None = None, *, updates: int = 5,
                  noise: float = NOISE, model=None, tokenizer=None,
                  log: Callable[[str], None] = print) -> NullTestResult:
    """``updates`` lr = 0 updates of ``config`` under each of ``settings`` (default
    ``default_settings``); ``model`` / ``tokenizer`` as for ``Run`` (default: the config's)."""
    if isinstance(updates, bool) or not isinstance(updates, int) or updates < 1:
        raise WorkbenchError(f"updates={updates!r} is invalid: expected an int >= 1")
    names = check_settings(default_settings(config) if settings is None else settings)
    base = config.replace(out_dir="", run_name="")  # nothing is written
    configs = {n: base.replace(**SETTINGS[n](noise)) for n in names}  # validated before any model is built
    for cfg in configs.values():
        check_fast_path(cfg.compile, cfg.autocast, cfg.device)
    run = Run(base, model=model, tokenizer=tokenizer, log=lambda s: None)
    device = next(run.model.parameters()).device
    before = _snapshot(run.model)
    band_lo, band_hi = _band(run.objective.params)
    rows, pooled, batches = [], {}, {}
    for name in names:
        cfg = configs[name]
        params = replace(sampling_params(cfg, run.knobs.applied, run.task), logits_dtype=cfg.sampler_logits_dtype,
                         logit_noise=cfg.sampler_logit_noise, record_kept=cfg.replay_sampling_mask)
        numerics = trainer_numerics(cfg)
        prompt_rng, generator = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
        optimizer = build_optimizer(run.model, 0.0, cfg.weight_decay, cfg.adam_betas)  # lr = 0: no update moves
        state: dict[str, Any] = {}
        metrics_rows, ratios, per_batch = [], [], []
        for k in range(updates):
            examples = render_examples(run.tokenizer, run.task.sample(prompt_rng, cfg.prompts_per_step), run.chat_template)
            run.model.eval()
            batch = run.sampler.generate(examples, cfg.group_size, params, generator=generator, policy_version=k)
            batch, _ = score(batch, list(cfg.rewards), advantage=cfg.advantage, advantage_params=cfg.advantage_params)
            expert = expert_batch(batch, run.tokenizer, run.task) if "expert_logprobs" in run.objective.needs else None
            tokens: dict[str, Any] = {}
            m = update_step(
                run.model, optimizer, batch.to(device), objective=run.objective, aggregation=cfg.aggregation,
                temperature=cfg.temperature, grad_clip=cfg.grad_clip, kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
                kl_is_corrected=cfg.kl_is_corrected, entropy_coef=cfg.entropy_coef, ref_model=run.ref_model,
                correction=cfg.correction_spec(), proximal=cfg.proximal, policy_version=k,
                loss_scale_factor=cfg.loss_scale_factor or None, micro_batch_size=cfg.micro_batch_size,
                autocast=cfg.autocast, compile=cfg.compile, context={"step": k, "state": state}, expert_batch=expert,
                keep_tokens=tokens, alp_scale=cfg.alp_scale, numerics=numerics)
            anchor = tokens["prox_logprobs"] if tokens["prox_logprobs"] is not None else batch.behavior_logprobs
            mask = batch.response_mask  # [B, T]
            x = (tokens["logprobs"].cpu().double() - anchor.cpu().double()) * (mask > 0)  # [B, T] log ratio
            ratios.append(x[mask > 0])
            per_batch.append((x, mask))
            metrics_rows.append(m)
        pooled[name], batches[name] = torch.cat(ratios), per_batch
        rows.append(_row(name, cfg, pooled[name], metrics_rows, band_lo, band_hi))
        log(f"null test: {name} done ({updates} updates)")
    unchanged = all(torch.equal(a, p.detach()) for a, p in zip(before, run.model.parameters()))
    run.close()
    return NullTestResult(pl.DataFrame(rows), pooled, batches, unchanged)


def _mean_metric(rows: list[dict[str, float]], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / len(vals) if vals else float("nan")


def _row(name: str, cfg: RunConfig, x: torch.Tensor, metrics: list[dict[str, float]], lo: float,
         hi: float) -> dict[str, Any]:
    """One table row: the setting, its knobs, band shares, the objective's metrics and |log r| quantiles."""
    r = x.exp()
    a = x.abs()
    knobs = ", ".join(f"{k}={getattr(cfg, k)}" for k in (*_EXACT, "replay_sampling_mask")
                      if getattr(cfg, k) not in ("", 0.0, False)) or "exact"
    out: dict[str, Any] = {
        "setting": name, "knobs": knobs, "tokens": int(x.numel()),
        "outside_band": float(((r < lo) | (r > hi)).double().mean()) if x.numel() else float("nan"),
        "outside_10pct": float(((r < 0.9) | (r > 1.1)).double().mean()) if x.numel() else float("nan"),
        "clipfrac": _mean_metric(metrics, "offpolicy/clipfrac"),
        "masked_frac": _mean_metric(metrics, "offpolicy/masked_frac"),
        "truncated_frac": _mean_metric(metrics, "correction/truncated_frac"),
        "log_ratio_mean": float(x.mean()) if x.numel() else float("nan"),
        "log_ratio_std": float(x.std(unbiased=False)) if x.numel() else float("nan"),
        "band_lo": lo, "band_hi": hi,
    }
    for q in QUANTILES:
        out[f"abs_q{round(q * 100)}"] = float(torch.quantile(a, q)) if a.numel() else float("nan")
    out["abs_max"] = float(a.max()) if a.numel() else float("nan")
    return out


def format_null_table(table: pl.DataFrame) -> str:
    """Markdown: one line per setting."""
    if table.height == 0:
        return "(no settings)"
    lo, hi = table["band_lo"][0], table["band_hi"][0]
    lines = [f"| setting | knobs | tokens | outside [{lo:g}, {hi:g}] | outside [0.9, 1.1] | clipfrac | masked_frac "
             "| truncated_frac | |log r| q50 | q90 | q99 | max |", "|---|---|---|" + "---|" * 9]
    for r in table.iter_rows(named=True):
        def pct(v: float) -> str:
            return "n/a" if v != v else f"{100 * v:.2f}%"
        lines.append(f"| {r['setting']} | {r['knobs']} | {r['tokens']} | {pct(r['outside_band'])} | "
                     f"{pct(r['outside_10pct'])} | {pct(r['clipfrac'])} | {pct(r['masked_frac'])} | "
                     f"{pct(r['truncated_frac'])} | {r['abs_q50']:.2e} | {r['abs_q90']:.2e} | {r['abs_q99']:.2e} | "
                     f"{r['abs_max']:.2e} |")
    return "\n".join(lines)


def noisiest_setting(result: NullTestResult) -> str:
    """The setting whose pooled log ratios have the largest std (the sequence-weight table's default)."""
    return max(result.log_ratios, key=lambda n: float(result.log_ratios[n].std(unbiased=False))
               if result.log_ratios[n].numel() > 1 else 0.0)


__all__ = ["NOISE", "QUANTILES", "SETTINGS", "NullTestResult", "check_settings", "default_settings",
           "format_null_table", "noisiest_setting", "run_null_test"]

"""Mismatch and staleness corrections on top of ANY objective (docs/design.md, "The reweight contract").

A ``Correction`` reweights and/or rejects tokens *after* the objective computed its per-token
loss: ``L'_t = keep_t * w_t * L_t`` with ``w`` a detached importance weight and ``keep`` a
rejection mask. Pass it to ``policy_loss(..., correction=...)`` as a ``Correction``, a preset name
(``"seq_mis"``), or a dict of ``Correction`` fields optionally naming a base preset
(``{"preset": "token_tis", "cap": 3.0}``); ``None`` (default) applies nothing.

Which policies (docs/design.md, "The reweight contract"; verl rollout correction, AReaL arXiv:2505.24298):

- **bypass** (two policies; ``prox_logprobs`` not given): rho = pi_theta / mu, computed from the
  current log-probs (detached) and the behaviour (sampler) log-probs. The objective's own ratio is
  pi_theta / mu as well, so an IS *weight* on top of a ratio objective counts the importance ratio
  twice (``workbench.lint`` warns; verl applies only rejection with PPO-clip in this mode). Useful
  combinations: ``reinforce`` + TIS (verl ``bypass_pg_is``), any objective + rejection only.
- **decoupled** (three policies; ``prox_logprobs`` given): the objective's ratio and clip are
  anchored at the proximal policy pi_prox (``policy_loss`` already uses ``prox_logprobs`` as the
  anchor), and rho = pi_prox / mu is the behaviour weight: capped (``weight``/``cap``) or masked
  (``reject``), AReaL's ``behave_imp_weight_cap`` (preset ``areal``: weight > 5 -> token masked).
  With pi_prox == mu this is exactly the plain objective (rho = 1: no weight, nothing rejected);
  with pi_prox == pi_theta the ratio is identically 1, clipping is inert and the gradient weight is
  min(pi_theta / mu, C) (or 0 when rejected).

The normaliser (``denominator``, both modes): ``valid`` (default) keeps the original token count:
rejected tokens get a zero loss but still count (AReaL divides by the original
``loss_mask_count``; M2PO footnote 2). ``kept`` aggregates with the kept mask in place of the
response mask, as verl does (it multiplies ``response_mask`` by the rejection mask, in bypass and
decoupled mode): token-mean divides by the kept tokens, the seq-mean modes count the rows with a
kept token and each row's token mean is over its kept tokens; seq-mean-token-sum-norm's constant is
unchanged. Without rejection both are the same. The objective sees every valid token either way (its
own batch statistics, e.g. M2PO's mask, include tokens the correction later rejects).

Weights (``weight``): ``token``: w_t = min(rho_t, C); ``sequence``: w_i = min(prod_t rho_t, C)
broadcast over the row (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training", fengyao.notion.site/off-policy-rl, TIS); ``geo_mean``: w_i =
min(exp(mean_t log rho_t), C) broadcast over the row, the length-normalised sequence weight whose
rejection form is Geo-RS (Liu, Li et al. 2025; AReaL ``rejection_sampling`` level=sequence with
metric=ratio, action=clamp, weights by the same geometric mean). ``clip_low`` (default 0 = off)
truncates from below: w = max(w, clip_low) (TRL ``vllm_importance_sampling_clip_min`` in its
``*_truncate`` modes, slime ``--tis-clip-low``), so w = clip(rho, clip_low, C). Always detached;
``normalize=True`` divides by the batch mean weight (tokens, or sequences for the row-level weights)
as verl's ``rollout_is_batch_normalize``.

Rejection (``reject``), statistics of log rho_t = l_t over a row's valid tokens (verl
``compute_rollout_rejection_mask``; Liu, Li et al. 2025 "When Speed Kills Stability",
richardli.xyz/rl-collapse):

- ``*_k1`` are ratio bounds: keep iff ``reject_low <= R <= reject_high`` with R = rho_t
  (``token_k1``, IcePop-style two-sided token mask), prod_t rho_t (``seq_sum_k1``, Seq-MIS) or
  exp(mean_t l_t) (``seq_mean_k1``, the geometric mean, Geo-RS); ``seq_any_k1`` rejects the whole
  row when ANY of its tokens has rho_t outside [reject_low, reject_high] (SkyRL
  ``outlier_token_is_threshold_low`` / ``_high``, suggested 1e-4 / 100: preset ``skyrl_outlier``).
  ``reject_low = 0`` means no lower bound. Compared in log space. verl's k1 statistic is -log rho, i.e. its bounds apply to mu/pi;
  for reciprocal bounds (0.5/2) the two agree, for Geo-RS's 0.999/1.001 up to 1e-6.
- ``*_k2`` / ``*_k3``: k2_t = l_t^2 / 2, k3_t = rho_t - 1 - l_t (Schulman's estimators of
  KL(mu || pi), http://joschu.net/blog/kl-approx.html), per token (``token_*``), summed
  (``seq_sum_*``), averaged (``seq_mean_*``) or maxed (``seq_max_*``) over the row; keep iff statistic <= ``reject_high``.

Presets (verl ``RolloutCorrectionConfig``, AReaL ``cli_args``), see ``PRESETS``:
``token_tis`` (token, C = 2), ``seq_tis`` (sequence, C = 2), ``token_mis`` (token weight C = 2 +
token reject outside [0.5, 2]), ``seq_mis`` (seq-TIS(2) + reject sequences whose product ratio is
outside [0.5, 2]), ``icepop`` (token weight, tokens outside [0.5, 5] rejected), ``geo_rs``
(reject rows whose geometric-mean ratio is outside [0.999, 1.001]), ``k3_rs`` (reject rows with
mean k3 > 0.01), ``areal`` (token weight, tokens with weight > 5 masked), ``areal_clamp`` (token
weight clamped at 5).

Numerics: log rho is finite at valid tokens (``policy_loss`` checks its inputs); it is clamped to
+-20 before every exp (verl's exp(+-20) safety bound), so no weight or statistic overflows; the
zeroing uses ``torch.where``, never ``0 * inf``.

Metrics (``correction/``): ``correction_metrics`` lists them: the raw ratio before the correction
(``rho_*``), the applied weight after it (``weight_mean``, ``ess``) and what it changed
(``truncated_frac``, ``truncated_low_frac``, ``rejected_frac``, ``changed_frac``, ...).

``apply_correction`` also returns ``changed`` [B, T]: the valid tokens whose weight the correction
changed (rejected, truncated, or weight != 1), which ``policy_loss`` reports as
``offpolicy/correction_changed_frac`` (and the correction as ``correction/changed_frac``).

``loglinear_proximal`` (AReaL's pi_prox without a forward pass) lives in ``proximal`` and is
re-exported here.

Left out: several rejection criteria at once (verl's comma lists; chain two corrections by
pre-masking instead), verl's ``binary_kl`` (KPop) criterion, AReaL's probability-space ``linear``
proximal approximation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from workbench.errors import WorkbenchError
from workbench.steps.reweight.correction_metrics import correction_metrics
from workbench.steps.reweight.inputs import LOG_RATIO_CLAMP, LossInputs
from workbench.steps.reweight.is_weighted import truncated_is_weight
from workbench.steps.reweight.proximal import PROXIMAL_MODES, loglinear_alpha, loglinear_proximal

WEIGHT_LEVELS: tuple[str, ...] = ("none", "token", "sequence", "geo_mean")
REJECT_STATS: tuple[str, ...] = (
    "none",
    "token_k1", "seq_sum_k1", "seq_mean_k1", "seq_any_k1",
    "token_k2", "seq_sum_k2", "seq_mean_k2", "seq_max_k2",
    "token_k3", "seq_sum_k3", "seq_mean_k3", "seq_max_k3",
)
DENOMINATORS: tuple[str, ...] = ("valid", "kept")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Correction:
    """A behaviour correction: detached IS weight and/or rejection mask (module docstring).

    ``weight``: none | token | sequence | geo_mean; ``cap``: truncation C >= 1 of the weight;
    ``clip_low``: lower truncation of the weight, 0 <= clip_low <= C (0 = off); ``reject``: one
    of ``REJECT_STATS``; ``reject_low``: lower ratio bound for ``*_k1`` (0 = none; must be 0 for
    k2/k3); ``reject_high``: upper bound (ratio for k1, statistic for k2/k3; required when
    rejecting); ``normalize``: divide the weights by their batch mean; ``denominator``: what the
    aggregation counts, every ``valid`` token (AReaL) or only the ``kept`` ones (verl).
    """

    weight: str = "none"
    cap: float = 2.0
    reject: str = "none"
    clip_low: float = 0.0
    reject_low: float = 0.0
    reject_high: float | None = None
    normalize: bool = False
    denominator: str = "valid"

    def __post_init__(self) -> None:
        def bad(field: str, value: Any, expected: str) -> WorkbenchError:
            return WorkbenchError(f"correction.{field}={value!r} is invalid: expected {expected}")

        if self.weight not in WEIGHT_LEVELS:
            raise bad("weight", self.weight, " | ".join(WEIGHT_LEVELS))
        if not (_is_number(self.cap) and self.cap >= 1.0):
            raise bad("cap", self.cap, "a number >= 1")
        if not (_is_number(self.clip_low) and 0.0 <= self.clip_low <= self.cap):
            raise bad("clip_low", self.clip_low, f"a number in [0, cap={self.cap!r}] (0 = no lower truncation)")
        if self.reject not in REJECT_STATS:
            raise bad("reject", self.reject, " | ".join(REJECT_STATS))
        if not (_is_number(self.reject_low) and self.reject_low >= 0.0):
            raise bad("reject_low", self.reject_low, "a number >= 0 (0 = no lower bound)")
        if self.reject_high is not None and not (_is_number(self.reject_high) and self.reject_high > 0.0):
            raise bad("reject_high", self.reject_high, "a number > 0")
        if not isinstance(self.normalize, bool):
            raise bad("normalize", self.normalize, "true or false")
        if self.denominator not in DENOMINATORS:
            raise bad("denominator", self.denominator, " | ".join(DENOMINATORS))
        if self.reject != "none":
            if self.reject_high is None:
                raise bad("reject_high", None, f"a number > 0 (required by reject={self.reject})")
            if self.reject.endswith("_k1"):
                if self.reject_low > self.reject_high:
                    raise bad("reject_low", self.reject_low, f"<= reject_high={self.reject_high!r}")
            elif self.reject_low != 0.0:
                raise bad("reject_low", self.reject_low, f"0 (only *_k1 statistics have a lower bound, "
                                                         f"reject={self.reject})")
        object.__setattr__(self, "cap", float(self.cap))
        object.__setattr__(self, "clip_low", float(self.clip_low))
        object.__setattr__(self, "reject_low", float(self.reject_low))
        if self.reject_high is not None:
            object.__setattr__(self, "reject_high", float(self.reject_high))

    @property
    def weighted(self) -> bool:
        """True if the correction multiplies the loss by an importance weight."""
        return self.weight != "none"

    @property
    def rejecting(self) -> bool:
        return self.reject != "none"

    def describe(self) -> str:
        """One line, e.g. ``sequence weight min(rho, 2) + reject seq_sum_k1 outside [0.5, 2]``."""
        parts = []
        if self.weighted:
            bound = f"clip(rho, {self.clip_low:g}, {self.cap:g})" if self.clip_low > 0 else f"min(rho, {self.cap:g})"
            parts.append(f"{self.weight} weight {bound}" + (" normalised" if self.normalize else ""))
        if self.rejecting:
            if self.reject.endswith("_k1"):
                lo = f"{self.reject_low:g}" if self.reject_low > 0 else "0"
                parts.append(f"reject {self.reject} outside [{lo}, {self.reject_high:g}]")
            else:
                parts.append(f"reject {self.reject} > {self.reject_high:g}")
            if self.denominator == "kept":
                parts.append("normaliser counts kept tokens")
        return " + ".join(parts) or "no-op"


PRESETS: dict[str, dict[str, Any]] = {
    "token_tis": dict(weight="token", cap=2.0),
    "seq_tis": dict(weight="sequence", cap=2.0),
    "token_mis": dict(weight="token", cap=2.0, reject="token_k1", reject_low=0.5, reject_high=2.0),
    "seq_mis": dict(weight="sequence", cap=2.0, reject="seq_sum_k1", reject_low=0.5, reject_high=2.0),
    "icepop": dict(weight="token", cap=5.0, reject="token_k1", reject_low=0.5, reject_high=5.0),
    "geo_rs": dict(reject="seq_mean_k1", reject_low=0.999, reject_high=1.001),
    "k3_rs": dict(reject="seq_mean_k3", reject_high=0.01),
    "areal": dict(weight="token", cap=5.0, reject="token_k1", reject_high=5.0),
    "areal_clamp": dict(weight="token", cap=5.0),
    "skyrl_outlier": dict(reject="seq_any_k1", reject_low=1e-4, reject_high=100.0),
}
"""Named corrections: verl rollout-correction presets (C = 2, Seq-MIS [0.5, 2], Geo-RS
[0.999, 1.001], K3-RS 0.01), IcePop's [0.5, 5] and AReaL's behaviour-weight cap 5 (mask / clamp)."""

PRESET_SOURCES: dict[str, str] = {
    "token_tis": "Yao et al. 2025 TIS; verl decoupled_token_is",
    "seq_tis": "verl decoupled_seq_is",
    "token_mis": "Liu, Li et al. 2025 (token-level MIS)",
    "seq_mis": "Liu, Li et al. 2025 Seq-MIS; verl decoupled_seq_is_rs",
    "icepop": "Ling team IcePop; verl decoupled_token_icepop",
    "geo_rs": "Liu, Li et al. 2025 Geo-RS; verl decoupled_geo_rs",
    "k3_rs": "verl decoupled_k3_rs",
    "areal": "AReaL arXiv:2505.24298 behave_imp_weight_cap=5, token mask",
    "areal_clamp": "AReaL arXiv:2505.24298 rejection_sampling action=clamp",
    "skyrl_outlier": "SkyRL off_policy_correction outlier_token_is_threshold_low=1e-4 / _high=100 (suggested values)",
}


def correction_preset(name: str) -> Correction:
    if name not in PRESETS:
        raise WorkbenchError(f"unknown correction preset {name!r}: valid presets are {', '.join(sorted(PRESETS))}")
    return Correction(**PRESETS[name])


def make_correction(spec: Any = None, params: dict[str, Any] | None = None) -> Correction | None:
    """Resolve ``spec`` (+ field overrides ``params``) into a ``Correction`` or None.

    ``spec``: None or "" (nothing; then ``params`` must be empty), a ``Correction``, a preset
    name, ``"custom"`` (the no-op ``Correction()`` as base), or a dict of fields with an optional
    ``"preset"`` key. Unknown fields or values -> one-line WorkbenchError.
    """
    params = dict(params or {})
    if isinstance(spec, dict):
        params = {**{k: v for k, v in spec.items() if k != "preset"}, **params}
        spec = spec.get("preset", "custom")
    if spec is None or spec == "":
        if params:
            raise WorkbenchError(f"correction_params={params!r} is invalid without a correction: set correction to "
                                 f"a preset ({', '.join(sorted(PRESETS))}) or custom")
        return None
    if isinstance(spec, Correction):
        base = spec
    elif spec == "custom":
        base = Correction()
    elif isinstance(spec, str):
        base = correction_preset(spec)
    else:
        raise WorkbenchError(f"correction={spec!r} is invalid: expected a preset name, custom, a dict or a Correction")
    fields = {f.name for f in dataclasses.fields(Correction)}
    for key in params:
        if key not in fields:
            raise WorkbenchError(f"correction has no field {key!r}: valid fields are {', '.join(sorted(fields))}")
    return dataclasses.replace(base, **params) if params else base


# --------------------------------------------------------------------------------------------
# applying a correction inside policy_loss
# --------------------------------------------------------------------------------------------

def behaviour_log_ratio(inp: LossInputs, behavior_logprobs: torch.Tensor, decoupled: bool) -> torch.Tensor:
    """log rho [B, T] (detached, 0 at padding): log pi_prox - log mu (decoupled) or log pi_theta - log mu."""
    zero = inp.logprobs.new_zeros(())
    beh = torch.where(inp.mask, behavior_logprobs.detach().to(inp.logprobs.dtype), zero)  # [B, T]
    num = inp.anchor_logprobs if decoupled else inp.logprobs.detach()  # [B, T]
    return torch.where(inp.mask, num - beh, zero)  # [B, T]


def rejection_keep(corr: Correction, inp: LossInputs, log_rho: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: valid tokens kept by ``corr.reject`` (all valid tokens when ``reject='none'``)."""
    valid = inp.mask  # [B, T]
    if not corr.rejecting:
        return valid.clone()
    level, kind = corr.reject.rsplit("_", 1)
    if level == "seq_any":  # a row survives only if every valid token's rho is inside the bounds
        inside = log_rho <= math.log(float(corr.reject_high))  # [B, T]
        if corr.reject_low > 0:
            inside = inside & (log_rho >= math.log(corr.reject_low))
        return valid & (inside | ~valid).all(dim=-1, keepdim=True)  # [B, T]
    lrc = log_rho.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # [B, T]
    if kind == "k1":
        tok = log_rho  # [B, T]
    elif kind == "k2":
        tok = 0.5 * lrc * lrc  # [B, T]
    else:
        tok = torch.exp(lrc) - 1.0 - lrc  # [B, T], k3 >= 0
    if level == "token":
        stat = tok  # [B, T]
    elif level == "seq_sum":
        stat = inp.seq_sum(tok).unsqueeze(-1)  # [B, 1]
    elif level == "seq_mean":
        stat = inp.seq_mean(tok).unsqueeze(-1)  # [B, 1]
    else:  # seq_max
        stat = torch.where(valid, tok, tok.new_full((), -math.inf)).amax(dim=-1, keepdim=True)  # [B, 1]
    hi = float(corr.reject_high)  # type: ignore[arg-type]
    if kind == "k1":
        ok = stat <= math.log(hi)
        if corr.reject_low > 0:
            ok = ok & (stat >= math.log(corr.reject_low))
    else:
        ok = stat <= hi
    return valid & ok  # [B, T]


def correction_weight(corr: Correction, inp: LossInputs, log_rho: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight [B, T] detached, 0 at padding; truncated at C [B, T]; raised to clip_low [B, T]) of ``corr``."""
    valid = inp.mask  # [B, T]
    none = torch.zeros_like(valid)  # [B, T]
    if not corr.weighted:
        return valid.to(log_rho.dtype), none, none
    if corr.weight == "geo_mean":  # exp(mean_t log rho) per row, clamped, truncated at C
        log_w = inp.seq_mean(log_rho).unsqueeze(-1).expand_as(log_rho).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        truncated = valid & (log_w > math.log(corr.cap))  # [B, T]
        w = torch.where(valid, torch.exp(log_w.clamp(max=math.log(corr.cap))), log_w.new_zeros(()))  # [B, T]
    else:
        w, truncated = truncated_is_weight(log_rho, valid, level=corr.weight, cap=corr.cap)  # [B, T] x2
    raised = valid & (w < corr.clip_low)  # [B, T]; never set when clip_low = 0 (w > 0)
    w = torch.where(raised, w.new_tensor(corr.clip_low), w)  # [B, T]
    if corr.normalize:
        if corr.weight == "token":
            vals = w[valid]  # [N]
        else:
            rows = inp.seq_lengths > 0  # [B]
            vals = (w.sum(dim=-1) / inp.seq_lengths.clamp(min=1))[rows]  # [B'], the row's weight
        mean = float(vals.mean()) if vals.numel() else 0.0
        if mean > 1e-8:
            w = w / mean
    return w, truncated, raised


@dataclass
class Corrected:
    """What ``apply_correction`` returns to ``policy_loss``."""

    per_token_loss: torch.Tensor  # [B, T] keep * w * L
    mask: torch.Tensor  # [B, T] bool, the aggregation's mask: valid tokens, or the kept ones (denominator)
    changed: torch.Tensor  # [B, T] bool, valid tokens whose weight changed: rejected, truncated or w != 1
    metrics: dict[str, Any]  # the correction/ metrics (tensors)


def apply_correction(
    corr: Correction, inp: LossInputs, behavior_logprobs: torch.Tensor, per_token_loss: torch.Tensor,
    decoupled: bool,
) -> Corrected:
    """Corrected per-token loss keep * w * L [B, T], the aggregation mask and the ``correction/`` metrics."""
    with torch.no_grad():
        log_rho = behaviour_log_ratio(inp, behavior_logprobs, decoupled)  # [B, T]
        w, truncated, raised = correction_weight(corr, inp, log_rho)  # [B, T] x3
        keep = rejection_keep(corr, inp, log_rho)  # [B, T]
        w = w.to(per_token_loss.dtype)
        changed = inp.mask & (~keep | truncated | raised | (w != 1.0))  # [B, T]
    loss = torch.where(keep, w * per_token_loss, per_token_loss.new_zeros(()))  # [B, T]
    with torch.no_grad():
        metrics = correction_metrics(inp, log_rho, w, truncated, raised, keep, changed, decoupled)
    return Corrected(loss, keep if corr.denominator == "kept" else inp.mask, changed, metrics)


__all__ = [
    "Corrected", "Correction", "DENOMINATORS", "PRESETS", "PRESET_SOURCES", "PROXIMAL_MODES", "REJECT_STATS",
    "WEIGHT_LEVELS", "apply_correction", "behaviour_log_ratio", "correction_preset", "correction_weight",
    "loglinear_alpha", "loglinear_proximal", "make_correction", "rejection_keep",
]

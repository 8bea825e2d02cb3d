"""Peer presets (workbench/steps/reweight/presets.py): each preset's policy loss and gradient against an
independent float64 reference written here in plain Python from the peer's own formula (verl
compute_policy_loss_vanilla, TRL GRPOTrainer loss_type="dapo", SkyRL ppo_policy_loss "regular", AReaL
ppo_actor_loss_fn, prime-rl default_loss_fn), on random batches with masked rows, NaN padding and log-ratios up
to +-50; plus the preset registry's lookups and errors.

The one deliberate difference, applied in the reference where the peer lacks it: the workbench clamps every
log-ratio to +-20 (workbench/steps/reweight/inputs.py), so beyond it the ratio is e^+-20 with zero gradient
(verl and SkyRL clamp the same way; TRL, AReaL and prime-rl do not). prime-rl's kl_tau (log r)^2 term is not
reproduced (the preset says so): its reference uses kl_tau = 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from workbench.cli import build_parser, config_from_args, main
from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.steps.reweight import policy_loss
from workbench.steps.reweight.presets import PEER_PRESETS, apply_preset, peer_preset, preset_fields
from workbench.steps.reweight.reference import objectives_markdown

torch.set_num_threads(1)
F64 = torch.float64
CLAMP = 20.0  # the workbench's log-ratio clamp (see the module docstring)


# ---------------------------------------------------------------------------------------------
# the peers' formulas, per token, in plain Python: (loss, d loss / d logp)
# ---------------------------------------------------------------------------------------------
def ratio(lp, old):
    """(r, dr/dlogp) of exp(lp - old) under the +-20 clamp."""
    lr = lp - old
    r = math.exp(min(max(lr, -CLAMP), CLAMP))
    return r, (r if -CLAMP < lr < CLAMP else 0.0)


def ppo_term(r, dr, a, lo=0.2, hi=0.2):
    """max(-A r, -A clip(r, 1 - lo, 1 + hi)) and its derivative (PPO, arXiv:1707.06347)."""
    pg1, pg2 = -a * r, -a * min(max(r, 1 - lo), 1 + hi)
    if 1 - lo < r < 1 + hi:  # the clip is the identity: both pieces are -A r
        return pg1, -a * dr
    return (pg1, -a * dr) if pg1 > pg2 else (pg2, 0.0)


def verl_vanilla(lp, old, beh, a):
    """verl: clip_pg_losses1 = max(pg1, pg2); for A < 0 min(clip_pg_losses1, -A clip_ratio_c), c = 3."""
    r, dr = ratio(lp, old)
    loss, grad = ppo_term(r, dr, a)
    if a < 0 and loss > -a * 3.0:
        return -a * 3.0, 0.0
    return loss, grad


def trl_dapo(lp, old, beh, a):
    """TRL: -min(coef_1 A, clamp(coef_1, 1 - eps, 1 + eps_high) A), eps = eps_high = 0.2."""
    r, dr = ratio(lp, old)
    loss1, loss2 = r * a, min(max(r, 0.8), 1.2) * a
    if 0.8 < r < 1.2:
        return -loss1, -a * dr
    return (-loss1, -a * dr) if loss1 < loss2 else (-loss2, 0.0)


def skyrl_regular(lp, old, beh, a):
    """SkyRL: -min(surr1, surr2), surr1 = r A, surr2 = clamp(r, 1 - 0.2, 1 + 0.2) A."""
    return trl_dapo(lp, old, beh, a)  # the same surrogate: the two peers' formulas coincide


def areal_decoupled(lp, prox, beh, a):
    """AReaL, rejection_sampling=None: max(-A r, -A clip(r)) with r = pi / pi_prox, no behaviour weight."""
    r, dr = ratio(lp, prox)
    return ppo_term(r, dr, a)


def areal_cap5(lp, prox, beh, a):
    """AReaL with RejectionSamplingConfig's defaults: w = pi_prox / mu; w > 5 masked; loss * w."""
    w = math.exp(prox - beh)
    if w > 5.0:
        return 0.0, 0.0
    loss, grad = areal_decoupled(lp, prox, beh, a)
    return w * loss, w * grad


def prime_rl(lp, old, beh, a):
    """prime-rl default_loss_fn with kl_tau = 0: masked where exp(lp) - exp(q) > 0.2 (A > 0) or < -0.2 (else)."""
    diff = math.exp(lp) - math.exp(old)
    masked = diff > 0.2 if a > 0 else diff < -0.2
    r, dr = ratio(lp, old)
    return (0.0, 0.0) if masked else (-a * r, -a * dr)


REFERENCES = {"verl_vanilla": verl_vanilla, "trl_grpo": trl_dapo, "skyrl_regular": skyrl_regular,
              "areal_decoupled": areal_decoupled, "areal_decoupled_cap5": areal_cap5, "prime_rl_default": prime_rl}


# ---------------------------------------------------------------------------------------------
# batches: log-probs <= 0, log-ratios in +-scale plus +-50 / +-30 outliers, an empty row, NaN padding
# ---------------------------------------------------------------------------------------------
def batch(seed, scale, token_adv):
    g = torch.Generator().manual_seed(seed)
    base = -torch.rand(5, 7, generator=g, dtype=F64) * 6
    lr = (torch.rand(5, 7, generator=g, dtype=F64) * 2 - 1) * scale
    lr[0, 0], lr[0, 1], lr[2, 0], lr[4, 1] = 50.0, -50.0, 30.0, -30.0
    lp = base + lr.clamp(max=0)  # [B, T] <= 0
    anchor = base - lr.clamp(min=0)  # [B, T] <= 0, lp - anchor = lr
    beh = (anchor - (torch.rand(5, 7, generator=g, dtype=F64) * 4 - 2)).clamp(max=0)  # mu, pi_prox / mu in e^+-2
    mask = (torch.rand(5, 7, generator=g) < 0.75).to(F64)
    mask[0, :2] = 1
    mask[1] = 0
    mask[3] = 0
    mask[3, 2] = 1
    adv = torch.randn(5, 7, generator=g, dtype=F64) * 2 if token_adv else torch.randn(5, generator=g, dtype=F64)
    return lp, anchor, beh, adv, mask


def reference(name, lp, anchor, beh, adv, mask):
    """(token-mean loss, gradient [B][T]) of the peer's formula; the normaliser counts every valid token."""
    fields = preset_fields(name)
    old = anchor if fields["proximal"] == "recompute" else beh
    fn, n = REFERENCES[name], max(int(mask.sum()), 1)
    a_bt = adv if adv.dim() == 2 else adv[:, None].expand_as(lp)
    total, grad = 0.0, [[0.0] * lp.shape[1] for _ in range(lp.shape[0])]
    for i in range(lp.shape[0]):
        for t in range(lp.shape[1]):
            if mask[i, t]:
                loss, d = fn(float(lp[i, t]), float(old[i, t]), float(beh[i, t]), float(a_bt[i, t]))
                total += loss / n
                grad[i][t] = d / n
    return total, grad


def run_preset(name, lp, anchor, beh, adv, mask, dtype=F64):
    """The workbench objective as the preset configures it: objective, params, aggregation, correction, anchor."""
    f = preset_fields(name)
    pad = mask == 0
    nan = torch.full((), math.nan, dtype=F64)
    leaf = torch.where(pad, nan, lp).to(dtype).requires_grad_()
    prox = torch.where(pad, nan, anchor).to(dtype) if f["proximal"] == "recompute" else None
    loss, metrics = policy_loss(f["objective"], leaf, torch.where(pad, nan, beh).to(dtype), adv.to(dtype),
                                mask.to(dtype), aggregation=f["aggregation"], prox_logprobs=prox,
                                correction=f["correction"] or None, **f["objective_params"])
    loss.backward()
    return loss, leaf.grad, metrics


def _close(got, expected, scale):
    assert abs(got - expected) <= 1e-6 * abs(expected) + 1e-12 * scale + 1e-290, (got, expected)


@pytest.mark.parametrize("name", sorted(PEER_PRESETS))
@pytest.mark.parametrize("seed,scale,token_adv", [(0, 0.3, False), (1, 3.0, True), (2, 50.0, False), (3, 1.0, True)])
def test_preset_loss_and_gradient_match_the_peer_formula(name, seed, scale, token_adv):
    lp, anchor, beh, adv, mask = batch(seed, scale, token_adv)
    exp_loss, exp_grad = reference(name, lp, anchor, beh, adv, mask)
    loss, grad, _ = run_preset(name, lp, anchor, beh, adv, mask)
    size = max(abs(x) for row in exp_grad for x in row) * int(mask.sum())
    _close(float(loss.detach()), exp_loss, size)
    assert torch.isfinite(grad).all() and (grad[mask == 0] == 0).all()
    assert any(d != 0.0 for row in exp_grad for d in row)
    for i in range(5):
        for t in range(7):
            _close(float(grad[i, t]), exp_grad[i][t], 0.0)


@pytest.mark.parametrize("name", sorted(PEER_PRESETS))
def test_float32_is_finite_and_padding_gets_no_gradient(name):
    lp, anchor, beh, adv, mask = batch(5, 50.0, True)
    loss, grad, metrics = run_preset(name, lp, anchor, beh, adv, mask, dtype=torch.float32)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[mask == 0] == 0).all()
    assert all(type(v) is float for v in metrics.values())


def test_the_batches_reach_every_branch_of_the_references():
    hits = {"clip": 0, "dual": 0, "prime_mask": 0, "cap5": 0, "clamp": 0}
    for seed, scale, token_adv in ((0, 0.3, False), (1, 3.0, True), (2, 50.0, False), (3, 1.0, True)):
        lp, anchor, beh, adv, mask = batch(seed, scale, token_adv)
        a_bt = adv if adv.dim() == 2 else adv[:, None].expand_as(lp)
        for i, t in mask.nonzero().tolist():
            x, p, q, a = float(lp[i, t]), float(anchor[i, t]), float(beh[i, t]), float(a_bt[i, t])
            r = math.exp(min(max(x - p, -CLAMP), CLAMP))
            hits["clip"] += (a > 0 and r > 1.2) or (a < 0 and r < 0.8)
            hits["dual"] += a < 0 and r > 3.0
            hits["prime_mask"] += prime_rl(x, q, q, a) == (0.0, 0.0) and a != 0
            hits["cap5"] += math.exp(p - q) > 5.0
            hits["clamp"] += abs(x - p) > CLAMP
    assert all(v > 0 for v in hits.values()), hits


# ---------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------
def test_every_preset_builds_a_valid_run_config_and_names_its_source():
    assert {"verl_vanilla", "trl_grpo", "skyrl_regular", "areal_decoupled", "prime_rl_default"} <= set(PEER_PRESETS)
    for name, p in PEER_PRESETS.items():
        cfg = RunConfig(**preset_fields(name), out_dir="")
        assert cfg.objective == p.fields["objective"] and p.name == name
        assert ".py" in p.source and p.peer and p.description
        assert set(REFERENCES) == set(PEER_PRESETS)


def test_verl_preset_is_dual_clip_with_c_3_and_token_mean():
    f = preset_fields("verl_vanilla")
    assert (f["objective"], f["objective_params"], f["aggregation"]) == (
        "dual_clip", {"clip_low": 0.2, "clip_high": 0.2, "clip_c": 3.0}, "token-mean")


def test_preset_fields_are_fresh_copies_and_overrides_apply():
    f = preset_fields("trl_grpo")
    f["objective_params"]["clip_high"] = 0.28
    assert preset_fields("trl_grpo")["objective_params"]["clip_high"] == 0.2
    g = apply_preset("trl_grpo", objective_params={"clip_low": 0.2, "clip_high": 0.28}, lr=1e-5)
    assert g["objective_params"]["clip_high"] == 0.28 and g["lr"] == 1e-5 and g["objective"] == "ppo_clip"


@pytest.mark.parametrize("call, needle", [
    (lambda: preset_fields("verl"), "preset='verl' is invalid: expected one of verl_vanilla, trl_grpo"),
    (lambda: peer_preset(3), "preset=3 is invalid"),
    (lambda: apply_preset("trl_grpo", clip_high=0.28), "'clip_high' is not a RunConfig field"),
])
def test_bad_names_are_one_line_errors(call, needle):
    with pytest.raises(WorkbenchError) as info:
        call()
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_list_presets_and_the_docs_show_every_preset(capsys):
    assert main(["list", "--presets"]) == 0
    out = capsys.readouterr().out
    md = objectives_markdown()
    for name, p in PEER_PRESETS.items():
        assert f"  {name} " in out and p.source in out
        assert f"| `{name}` | {p.peer} |" in md


def test_preset_flag_sets_the_fields_under_the_config_file_and_the_flags(tmp_path):
    cfg = config_from_args(build_parser().parse_args(["lint", "--preset", "verl_vanilla", "--staleness", "4"]))
    ref = RunConfig.from_dict(preset_fields("verl_vanilla"))
    for name in preset_fields("verl_vanilla"):
        assert getattr(ref, name) == getattr(cfg, name), name
    assert cfg.staleness == 4
    over = config_from_args(build_parser().parse_args(["lint", "--preset", "verl_vanilla", "--aggregation", "seq-mean-token-mean"]))
    assert over.aggregation == "seq-mean-token-mean" and over.objective == cfg.objective  # a flag wins over the preset
    with pytest.raises(WorkbenchError, match=r"^preset='verl' is invalid: expected one of verl_vanilla") as e:
        config_from_args(build_parser().parse_args(["lint", "--preset", "verl"]))
    assert "\n" not in str(e.value)

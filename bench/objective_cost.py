"""Cost of each objective: forward + backward of ``policy_loss`` relative to ``ppo_clip``.

Batch: 256 responses x 64 tokens (right-padded, lengths 8..64), logprobs a leaf requiring grad,
log-ratios ~ N(0, 0.15) with 2% outliers, group-normalised [B] advantages. Each repeat times
``policy_loss(...)`` + ``loss.backward()`` for every objective, round-robin (so load from other
processes on the machine hits all objectives alike); the table shows the median over repeats, the
ratio to ``ppo_clip`` measured in the same run, and the part spent in the shared diagnostics
(same inputs, objective + aggregate + backward only). Ratios above 2x are flagged with the reason.

Run: ``python bench/objective_cost.py [--repeats 30]``. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workbench.steps.reweight import OBJECTIVES, aggregate, make_inputs, policy_loss, validate_params
from workbench.steps.reweight.core import objective_needs

# Why an objective may cost more than ppo_clip (printed when its ratio exceeds the threshold).
REASONS = {
    "m2po": "sorts the trust-region (log r)^2 and gathers/scatters them (boolean indexing, argsort)",
    "gspo": "row reductions for the sequence ratio plus broadcasting the per-row loss back to tokens",
    "gspo_token": "row reductions for the sequence ratio plus the stop-gradient token ratio",
    "geo_mean": "per-token log-space clipping plus row reductions and a broadcast",
    "topr": "row reductions for the sequence ratio and per-sign truncation bounds",
    "tis": "log-space weight computation (and row sums at sequence level)",
    "sapo": "sigmoid gate with a per-token temperature",
    "bapo": "the bound search: sorts the ratios once and evaluates every candidate bound (one host sync)",
    "clip_cov": "token covariance, the eligible set (nonzero) and a batch-hashed random permutation on the host",
    "kl_cov": "token covariance and a stable sort of all valid tokens for the top-k",
    "tb": "row sums, torch.unique over group ids and per-group means (index_add)",
    "gbpo": "per-group medians: two stable argsorts and a bincount",
    "r2vpo": "the batch ratio moment (one host sync for the dual step) and a second quadratic term",
    "chord": "the SFT term over the expert batch (a second reduction); the expert forward pass is extra",
    "mhpo": "tanh modulator plus two Weibull hazard powers",
    "rec": "mask, weight and regulariser branches",
}


def make_batch(b: int = 256, t: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    beh = -torch.rand(b, t, generator=g) * 3  # [B, T]
    lr = torch.randn(b, t, generator=g) * 0.15  # [B, T]
    outliers = torch.rand(b, t, generator=g) < 0.02  # [B, T]
    lr = torch.where(outliers, torch.randn(b, t, generator=g) * 2.0, lr)
    lengths = torch.randint(8, t + 1, (b, 1), generator=g)  # [B, 1]
    mask = (torch.arange(t)[None, :] < lengths).float()  # [B, T]
    rewards = (torch.rand(b, generator=g) < 0.4).float().view(-1, 8)  # groups of 8
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).view(-1)  # [B]
    return beh + lr, beh, adv, mask


def make_context(name: str, batch) -> dict | None:
    """What objectives with ``needs`` get: groups of 8, 0/1 rewards, a state, a reference and an
    expert batch of one demonstration per group (32 x 64 tokens)."""
    if not objective_needs(name):
        return None
    _, beh, adv, mask = batch
    b = beh.shape[0]
    return {"group_id": torch.arange(b) // 8, "rewards": (adv > 0).float(), "step": 100, "state": {},
            "ref_logprobs": beh - 0.1, "expert_logprobs": beh[::8].clone().requires_grad_(),
            "expert_mask": mask[::8]}


def time_full(name: str, batch) -> float:
    lp0, beh, adv, mask = batch
    lp = lp0.clone().requires_grad_()
    agg = OBJECTIVES.meta(name)["default_aggregation"]
    ctx = make_context(name, batch)
    t0 = time.perf_counter()
    loss, _ = policy_loss(name, lp, beh, adv, mask, aggregation=agg, context=ctx)
    loss.backward()
    return time.perf_counter() - t0


def time_core(name: str, batch) -> float:
    """Objective + aggregate + backward, without validation and diagnostics."""
    lp0, beh, adv, mask = batch
    lp = lp0.clone().requires_grad_()
    meta = OBJECTIVES.meta(name)
    params = validate_params(name, {})
    ctx = make_context(name, batch) or {}
    t0 = time.perf_counter()
    inp = make_inputs(lp, beh, adv, mask)
    inp.context = ctx
    out = OBJECTIVES.get(name)(inp, **params)
    loss = aggregate(out.per_token_loss, inp.mask, meta["default_aggregation"])
    (loss if out.extra_loss is None else loss + out.extra_loss).backward()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threshold", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch = make_batch()
    names = OBJECTIVES.names()
    full: dict[str, list[float]] = {n: [] for n in names}
    core: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(3):  # warm-up
        for n in names:
            time_full(n, batch)
            time_core(n, batch)
    for _ in range(args.repeats):
        for n in names:
            full[n].append(time_full(n, batch))
            core[n].append(time_core(n, batch))
    med = {n: statistics.median(v) * 1e3 for n, v in full.items()}
    med_core = {n: statistics.median(v) * 1e3 for n, v in core.items()}
    base, base_core = med["ppo_clip"], med_core["ppo_clip"]
    b, t = batch[0].shape
    print(f"policy_loss forward+backward, batch {b}x{t}, median of {args.repeats}, torch threads 1")
    print(f"{'objective':<12} {'total ms':>9} {'x ppo_clip':>10} {'objective-only ms':>18} {'x ppo_clip':>10}")
    flagged = []
    for n in sorted(names, key=med.get):
        ratio, ratio_core = med[n] / base, med_core[n] / base_core
        mark = "  <-- >%.0fx" % args.threshold if ratio > args.threshold else ""
        print(f"{n:<12} {med[n]:>9.3f} {ratio:>10.2f} {med_core[n]:>18.3f} {ratio_core:>10.2f}{mark}")
        if ratio > args.threshold:
            flagged.append((n, ratio))
    share = 1 - base_core / base
    print(f"shared validation + diagnostics: {base - base_core:.3f} ms of ppo_clip's {base:.3f} ms ({share:.0%})")
    for n, ratio in flagged:
        print(f"FLAG {n}: {ratio:.2f}x ppo_clip: {REASONS.get(n, 'no known reason: investigate')}")
    if not flagged:
        print(f"no objective above {args.threshold:.1f}x ppo_clip")


if __name__ == "__main__":
    main()

"""How much narrower is a paired branch comparison than independent seeds, on the built-in default?

    python bench/branch_precision.py [--at 20] [--steps 20] [--repeats 4] [--threads 1] [--knob staleness --value 8]

The contrast: the default config (the control) vs the live knob ``--knob`` set to ``--value`` from
update K on (default staleness 0 -> 8; e.g. ``--knob lr --value 4e-4``), final held-out accuracy after
K + M updates (built-in default config: task, model, batch, eval_size 256; CPU).

- paired: one parent run to update K (checkpoint there), then ``workbench.branch.fork`` with R repeats
  (common random numbers: both arms of a repeat share the checkpoint and the random streams);
- independent: R seeds per arm, each run from scratch for K + M updates, the variant arm switching
  the knob at update K (a knob schedule), so both designs measure the same change.

For each design it prints the 95% interval of the difference of final accuracies: the percentile
bootstrap of ``workbench.stats.difference_interval`` (paired=True for the branches, unpaired for the
seeds, the same estimator family on both) and the standard error (paired: sd(d) / sqrt(R);
independent: sqrt(s_a^2 / R + s_b^2 / R)); then the ratios paired / independent. With R = 4 each
width is itself noisy: read the ratio as an order of magnitude, or raise --repeats. Also printed:
the Newcombe interval width of one pair of evaluations (``stats.wilson_difference``), the binomial
noise floor of a single comparison. A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import workbench  # noqa: E402,F401
from workbench.branch import fork  # noqa: E402
from workbench.config import RunConfig  # noqa: E402
from workbench.loop import Run  # noqa: E402
from workbench.stats import difference_interval, wilson_difference  # noqa: E402


def final_accuracy(run: Run) -> float:
    acc = run.summary()["eval/final_accuracy"]
    return float(acc if acc is not None else run.evaluate())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--at", type=int, default=20, help="fork update K (default 20)")
    ap.add_argument("--steps", type=int, default=20, help="updates after K (default 20)")
    ap.add_argument("--repeats", type=int, default=4, help="repeats (paired) and seeds per arm (independent)")
    ap.add_argument("--knob", default="staleness", help="the live knob the variant changes at update K")
    ap.add_argument("--value", type=float, default=8, help="its value from update K (default 8)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    k, m, r = args.at, args.steps, args.repeats
    change = {args.knob: int(args.value) if args.knob in ("staleness", "sync_every", "max_staleness") else args.value}
    quiet = lambda s: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        base = RunConfig(threads=args.threads, steps=k + m, eval_every=m, checkpoint_every=k, keep_checkpoints=0,
                         out_dir=tmp)
        t0 = time.perf_counter()
        parent = Run(base.replace(run_name="parent"), log=quiet)
        parent.run(k)
        parent.close()
        bs = fork(Path(tmp) / "parent", at=k, changes=[{}, change], steps=m, repeats=r,
                  out_dir=Path(tmp) / "branches", log=quiet)
        fin, eval_n = bs.finals("eval/accuracy"), bs.eval_n()
        a = np.array([fin.filter((fin["variant"] == 1) & (fin["repeat"] == i))["value"][0] for i in range(r)])
        b = np.array([fin.filter((fin["variant"] == 0) & (fin["repeat"] == i))["value"][0] for i in range(r)])
        t_paired = time.perf_counter() - t0
        t0 = time.perf_counter()
        ind = {0: [], 1: []}
        for seed in range(r):
            for arm in (0, 1):
                schedule = [{"update": k, "changes": change}] if arm else None
                run = Run(base.replace(seed=seed, run_name=f"seed{seed}-arm{arm}", checkpoint_every=0),
                          knob_schedule=schedule, log=quiet)
                run.run()
                ind[arm].append(final_accuracy(run))
                run.close()
        t_ind = time.perf_counter() - t0
    xa, xb = np.array(ind[1]), np.array(ind[0])
    p = difference_interval(a, b, paired=True)
    q = difference_interval(xa, xb)
    se_p = float(np.std(a - b, ddof=1)) / math.sqrt(r)
    se_q = math.sqrt(float(np.var(xa, ddof=1)) / r + float(np.var(xb, ddof=1)) / r)
    n = eval_n
    nw = wilson_difference(float(a.mean()), n, float(b.mean()), n)
    print(f"default config, fork at update {k}, {m} updates after, {args.knob} {getattr(base, args.knob)} -> "
          f"{change[args.knob]}, R = {r}")
    print(f"paired      finals variant {np.round(a, 4).tolist()} control {np.round(b, 4).tolist()}  ({t_paired:.0f} s)")
    print(f"independent finals variant {np.round(xa, 4).tolist()} control {np.round(xb, 4).tolist()}  ({t_ind:.0f} s)")
    print(f"paired      difference {p.estimate:+.4f}  95% CI [{p.lo:+.4f}, {p.hi:+.4f}]  width {p.hi - p.lo:.4f}  SE {se_p:.4f}")
    print(f"independent difference {q.estimate:+.4f}  95% CI [{q.lo:+.4f}, {q.hi:+.4f}]  width {q.hi - q.lo:.4f}  SE {se_q:.4f}")
    print(f"one pair of evaluations (n = {n}): Newcombe width {nw.hi - nw.lo:.4f}")
    width_ratio = (p.hi - p.lo) / (q.hi - q.lo) if q.hi > q.lo else math.nan
    print(f"ratio paired / independent: interval width {width_ratio:.3f}, standard error "
          f"{se_p / se_q if se_q > 0 else math.nan:.3f}")


if __name__ == "__main__":
    main()

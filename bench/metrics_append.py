"""Per-update cost of writing a run's metrics, at 300, 10,000 and 100,000 rows already written.

    python bench/metrics_append.py [--sizes 300,10000,100000] [--appends 2048] [--old-updates 10]

New: ``MetricsLog.append``: one JSON line appended to ``metrics.tail.jsonl``, and every 512th a
seal of the tail into a parquet part. Each size is pre-filled through ``append`` itself, then
``--appends`` more appends (a multiple of 512: whole seal cycles) are timed, in rounds of 256 across
the sizes (so load from other processes on the machine hits every size alike). The table shows the
median append, the mean (seals included: the amortised per-update cost) and the slowest (a seal);
the ratio to the smallest size is of the mean (target: last / first <= 1.5). ``rows``: rows written
when the timing starts (each size grows by ``--appends`` meanwhile).
Old (the baseline, measured in the same run): what the loop did before, ``pl.from_dicts`` of every
row and an atomic rewrite of ``metrics.parquet`` per update, timed for ``--old-updates`` updates at
sizes up to 10,000 rows; above that it is extrapolated linearly in the rows (it is O(rows): a
measurement at 100,000 rows takes seconds per update) and marked ``~``.
One-off costs of the new layout, paid once per session, not per update: ``open`` (a writer opening
the folder: recovery), ``read`` (``read_metrics``: what a resume or a sweep reads) and ``compact``
(folding parts and tail into ``metrics.parquet`` at the session's end); ``B/row``: bytes on disk
per row before compaction.

Rows are shaped like the loop's: 100 float columns named like the real ones, ``update`` and
``policy_version`` ints, ``knob/objective`` a string, ``eval/accuracy`` and ``perf/time_eval``
every 10th row. Prints a table; asserts nothing. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl

from workbench.runs.metrics import MetricsLog, read_metrics
from workbench.runs.rundir import atomic_write_parquet

FLOATS = (
    [f"knob/{k}" for k in ("staleness", "sync_every", "lr", "temperature", "tau")]
    + [f"reward/{k}" for k in ("mean", "std", "accuracy", "zero_var_group_frac", "filtered_seqs",
                               "response_len_mean", "response_len_max", "adv_mean", "adv_std", "pos_adv_frac")]
    + [f"buffer/{k}" for k in ("generated_batches", "dropped_batches", "dropped_stale_seqs", "synced", "queue_len")]
    + [f"offpolicy/{k}" for k in ("ratio_mean", "ratio_min", "ratio_max", "ratio_pos_q05", "ratio_pos_q50",
                                  "ratio_pos_q95", "ratio_neg_q05", "ratio_neg_q50", "ratio_neg_q95", "m2",
                                  "ess_token", "ess_seq", "kl_k1", "kl_k3", "chi2_token", "pos_share",
                                  "cov_logp_adv", "clipfrac", "masked_frac", "m2_after", "staleness_mean",
                                  "staleness_max", "staleness_min")]
    + [f"mismatch/{part}_{k}" for part in ("total", "drift", "engine")
       for k in ("mean", "abs_mean", "abs_max", "m2", "k3", "chi2", "q05", "q50", "q95")]
    + [f"loss/{k}" for k in ("policy", "skipped_nonfinite", "total", "entropy", "grad_norm", "kl")]
    + [f"perf/{k}" for k in ("time_forward", "time_loss", "time_backward", "train_tokens", "time_generate",
                             "time_score", "time_sync", "time_trainer_logprobs", "gen_tokens", "time_step",
                             "gen_tokens_per_s", "train_tokens_per_s")]
    + ["m2po/tau_star", "m2po/trust_frac", "batch/sequences", "mismatch/engine_ppl_ratio",
       "mismatch/engine_share", "reward/format", "reward/overlong", "offpolicy/ess_min", "offpolicy/w_max",
       "offpolicy/w_min", "loss/kl_k3", "loss/sft"]
)


def make_row(k: int) -> dict:
    row = {"update": k, "policy_version": k + 1, "knob/objective": "m2po"}
    row.update({name: ((k * 2654435761 + i * 40503) % 1000003) / 997.0 for i, name in enumerate(FLOATS)})
    if k % 10 == 9:
        row["eval/accuracy"] = (k % 97) / 97
        row["perf/time_eval"] = 0.25
    return row


def time_new(log: MetricsLog, start: int, n: int) -> list[float]:
    out = []
    for k in range(start, start + n):
        row = make_row(k)
        t = time.perf_counter()
        log.append(row)
        out.append(time.perf_counter() - t)
    return out


def time_old(rows: list[dict], path: Path, n: int) -> float:
    """The former per-update write: every row to a DataFrame, the whole file rewritten atomically."""
    out = []
    for i in range(n + 1):  # the first one warms up (polars' first write)
        row = make_row(len(rows))
        t = time.perf_counter()
        rows.append(row)
        atomic_write_parquet(pl.from_dicts(rows, infer_schema_length=None), path)
        if i:
            out.append(time.perf_counter() - t)
    return statistics.median(out)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="300,10000,100000", help="rows already written, comma-separated")
    parser.add_argument("--appends", type=int, default=2048, help="timed appends per size (new)")
    parser.add_argument("--old-updates", type=int, default=10, help="timed updates per size (old)")
    parser.add_argument("--old-max-rows", type=int, default=10_000, help="extrapolate the old cost above this")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="metrics-bench-") as tmp:
        dirs = {n: Path(tmp) / f"rows{n}" for n in sizes}
        logs = {}
        for n, d in dirs.items():  # pre-fill through the real path
            d.mkdir()
            logs[n] = MetricsLog(d)
            for k in range(n):
                logs[n].append(make_row(k))
        times: dict[int, list[float]] = {n: [] for n in sizes}
        per_round = min(256, args.appends)
        rounds = max(1, args.appends // per_round)
        for r in range(rounds):
            for n in sizes:
                times[n] += time_new(logs[n], n + r * per_round, per_round)
        one_off = {}
        for n, d in dirs.items():
            size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
            t_open = timed(lambda: MetricsLog(d))
            t_read = timed(lambda: read_metrics(d))
            t_compact = timed(logs[n].compact)
            one_off[n] = (size / logs[n].rows, t_open, t_read, t_compact)
        old: dict[int, tuple[float, bool]] = {}
        measured = [n for n in sizes if n <= args.old_max_rows]
        for n in measured:
            path = Path(tmp) / f"old{n}.parquet"
            old[n] = (time_old([make_row(k) for k in range(n)], path, args.old_updates), False)
        if measured:
            ref = max(measured)
            for n in sizes:
                if n not in old:
                    old[n] = (old[ref][0] * n / ref, True)

    new = {n: statistics.fmean(v) for n, v in times.items()}
    first = new[sizes[0]]
    print(f"metrics write per update: {len(FLOATS) + 3} columns (+2 every 10th row); new: "
          f"{rounds * per_round} appends per size; old: median of {args.old_updates} full rewrites "
          f"(~ = extrapolated)")
    print(f"{'rows':>8} {'median ms':>9} {'mean ms':>8} {'max ms':>7} {'x first':>8} {'old ms':>10} "
          f"{'old/new':>8} | {'B/row':>6} {'open s':>7} {'read s':>7} {'compact s':>9}")
    for n in sizes:
        o, extrapolated = old.get(n, (float("nan"), False))
        mark = "~" if extrapolated else " "
        b, t_open, t_read, t_compact = one_off[n]
        print(f"{n:>8} {statistics.median(times[n]) * 1e3:>9.3f} {new[n] * 1e3:>8.3f} "
              f"{max(times[n]) * 1e3:>7.1f} {new[n] / first:>8.2f} {mark}{o * 1e3:>9.1f} {o / new[n]:>8.0f} | "
              f"{b:>6.0f} {t_open:>7.2f} {t_read:>7.2f} {t_compact:>9.2f}")
    print(f"new, mean per update: last / first = {new[sizes[-1]] / first:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()

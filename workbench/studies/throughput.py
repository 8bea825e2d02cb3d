"""Synchronous vs asynchronous RL in wall-clock: a closed-form throughput model, the peers' published
speed-ups, and accuracy against simulated wall-clock for a sweep's runs.

    from workbench.studies import throughput as tp
    spec = tp.ThroughputSpec(batch=256, workers=256, decode_step_s=0.01, update_s=60.0,
                             length_median=4000, length_sigma=0.3, length_max=27_648, bound=4)
    tp.compare(spec)                       # seconds per update in both modes, speed-up, regime, staleness
    tp.wall_clock(metrics, spec, "async")  # a run's simulated wall-clock seconds, one per update row
    tp.published_speedups()                # what AReaL, verl and PipelineRL report, with the settings
    tp.published_comparison()              # the model's speed-up on a spec for each, beside the reported one
    tp.accuracy_vs_wall_clock({"on-policy": m0, "stale": m1},
                              {"on-policy": (spec, "sync"), "stale": (spec, "async")})

``python -m workbench throughput`` prints the comparison and the published figures (the command:
``workbench.cli.throughput``).

The pieces: ``throughput_model`` (the spec, the formulas and their derivation in its docstring: the
synchronous step waits for the expected longest of B lengths, the asynchronous one is
max(update_s, B E[L] decode_step_s / W_eff) with W_eff = min(W, eta B) under AReaL's staleness bound),
``throughput_published`` (the peers' figures, as reported, and ``SPECS``), ``throughput_chart`` (the
Altair chart with each evaluation's Wilson interval as a band).

With the default spec (B = W = 256, 16 per prompt, lognormal lengths of median 4000 tokens and sigma
0.3 cut at a 27K-token limit as AReaL's recipe cuts them, 10 ms decode steps, 60 s updates, bound 4
as AReaL recommends) the model gives 2.58x, training-bound: inside the 2-2.8x the peers report.
"""

from __future__ import annotations

from workbench.studies.throughput_chart import accuracy_vs_wall_clock, wall_clock_frame
from workbench.studies.throughput_model import (MODES, WALL_COLUMN, ThroughputSpec, async_generation_s,
                                                async_startup_s, async_update_time, compare, effective_workers,
                                                expected_max, expected_staleness, length_distribution, mean_length,
                                                regime, sync_generation_s, sync_update_time, wall_clock,
                                                wall_clock_at)
from workbench.studies.throughput_published import SPEC_INPUTS, SPECS, published_comparison, published_speedups

__all__ = ["MODES", "SPECS", "SPEC_INPUTS", "WALL_COLUMN", "ThroughputSpec", "accuracy_vs_wall_clock",
           "async_generation_s", "async_startup_s", "async_update_time", "compare", "effective_workers",
           "expected_max", "expected_staleness", "length_distribution", "mean_length", "published_comparison",
           "published_speedups", "regime", "sync_generation_s", "sync_update_time", "wall_clock", "wall_clock_at",
           "wall_clock_frame"]

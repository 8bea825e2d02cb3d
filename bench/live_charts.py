"""What the live charts cost: update time with the control panel's live charts at the default throttle
against the same training with no panel at all.

    python bench/live_charts.py [--updates 40] [--block 5] [--tiny] [--seconds 3.0]

Two identical runs (same config, seed, model): A is a bare ``Run`` stepped by a ``BackgroundTrainer``;
B is a ``ControlPanel`` in interactive mode (JupyterChart widget, render thread, per-token view, status
line) with the default throttle (``workbench.ui.live.DEFAULT_EVERY_UPDATES`` / ``..._SECONDS``).
They are stepped in alternating blocks of ``--block`` updates so both see the same machine load, and the
ratio of mean wall time per update B / A is printed (target <= 1.05). Without a browser the widget's
messages go nowhere, but the whole cost on the Python side (building the spec, serialising it for the
comm, the per-token forward, the HTML) is paid, in the render thread and the training thread's hook.

Default model: the built-in model's size (0.53 M parameters, untrained, so no warm start is needed)
with the default batch (32 prompts x 8 samples); ``--tiny`` uses the CI model (much shorter updates,
a harsher test of the fixed per-render cost).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import workbench  # noqa: E402,F401
from workbench.config import RunConfig  # noqa: E402
from workbench.loop import Run  # noqa: E402
from workbench.policy.model import ModelConfig, build_model  # noqa: E402
from workbench.notebook import TINY_MODEL, TINY_REWARDS  # noqa: E402
from workbench.policy.tokenizer import build_char_tokenizer  # noqa: E402
from workbench.ui import BackgroundTrainer, ControlPanel  # noqa: E402
from workbench.ui.live import DEFAULT_EVERY_SECONDS, DEFAULT_EVERY_UPDATES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=40, help="measured updates per side")
    ap.add_argument("--block", type=int, default=5, help="updates per alternating block")
    ap.add_argument("--tiny", action="store_true", help="the CI model and a small batch")
    ap.add_argument("--seconds", type=float, default=DEFAULT_EVERY_SECONDS, help="chart throttle (seconds)")
    args = ap.parse_args()

    tok = build_char_tokenizer()
    size = ModelConfig(**TINY_MODEL) if args.tiny else ModelConfig()
    fields = dict(out_dir="", rewards=TINY_REWARDS, steps=10**6, eval_every=10, eval_size=64, staleness=4)
    if args.tiny:
        fields.update(prompts_per_step=8, group_size=4)
    config = RunConfig(**fields)

    bare = Run(config, model=build_model(size, tok, seed=0), tokenizer=tok, log=lambda s: None)
    a = BackgroundTrainer(bare)
    panel = ControlPanel(config, model=build_model(size, tok, seed=0), tokenizer=tok, headless=False,
                         chart_every=DEFAULT_EVERY_UPDATES, chart_seconds=args.seconds, log=lambda s: None)
    b = panel.trainer

    def block(trainer: BackgroundTrainer, n: int) -> float:
        t0 = time.perf_counter()
        trainer.step(n)
        trainer.wait()
        if trainer.error is not None:
            raise trainer.error
        return (time.perf_counter() - t0) / n

    block(a, 2), block(b, 2)  # warm-up: first generation, allocator, chart widget
    ta, tb = [], []
    for i in range(max(1, args.updates // args.block)):
        for trainer, out in (((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))):
            out.append(block(trainer, args.block))
    panel.close()
    mean_a, mean_b = statistics.mean(ta), statistics.mean(tb)
    print(f"model: {'tiny' if args.tiny else 'built-in size'}; batch {config.batch_size} sequences; "
          f"throttle: every {DEFAULT_EVERY_UPDATES} update(s) and {args.seconds:g} s")
    print(f"without live charts: {1000 * mean_a:8.1f} ms/update (median {1000 * statistics.median(ta):.1f})")
    print(f"with live charts:    {1000 * mean_b:8.1f} ms/update (median {1000 * statistics.median(tb):.1f}); "
          f"{panel.charts.renders} renders, last {1000 * panel.charts.last_render_seconds:.1f} ms")
    print(f"ratio with / without: {mean_b / mean_a:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()

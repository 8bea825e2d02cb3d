"""The progress bar of ``Run.run(progress=True)`` and the panel: one tick per update, with the
latest row's train accuracy, held-out accuracy (when evaluated), clipped / masked fractions and
staleness as its postfix."""

from __future__ import annotations

from typing import Any


def update_bar(n: int):
    """A bar of ``n`` updates (``tqdm.auto``: a widget in a notebook, text elsewhere; imported when a
    bar is asked for, since it probes for IPython)."""
    from tqdm.auto import tqdm

    return tqdm(total=n, unit="upd")


def progress_postfix(row: dict[str, Any]) -> str:
    """The bar's text for one metrics row."""
    parts = [f"acc={row.get('reward/accuracy', float('nan')):.2f}"]
    if "eval/accuracy" in row:
        parts.append(f"eval={row['eval/accuracy']:.2f}")
    parts.append(f"clip={row.get('offpolicy/clipfrac', 0):.3f} mask={row.get('offpolicy/masked_frac', 0):.3f}")
    parts.append(f"stale={row.get('offpolicy/staleness_mean', 0):.0f}")
    return " ".join(parts)


__all__ = ["progress_postfix", "update_bar"]

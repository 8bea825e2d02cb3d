"""The one shared loss aggregation: per-token losses [B, T] -> a scalar.

In context: docs/design.md, "Aggregation".

Every objective returns a per-token loss; ``aggregate`` turns it into the scalar that is
backpropagated. The four modes follow verl's ``agg_loss`` names and formulas:

- ``token-mean``: sum_{i,t} m L / sum_{i,t} m (one global token count: DAPO arXiv:2503.14476,
  M2PO arXiv:2510.01161, Lite PPO).
- ``seq-mean-token-sum``: (1/B') sum_i sum_t m L, B' = number of rows with >= 1 valid token.
- ``seq-mean-token-mean``: (1/B') sum_i [sum_t m L / sum_t m] (original GRPO arXiv:2402.03300;
  GSPO arXiv:2507.18071 and SAPO arXiv:2511.20347 use it).
- ``seq-mean-token-sum-norm``: sum_{i,t} m L / L_norm with L_norm = ``loss_scale_factor``
  (default: T, the mask width). Dr. GRPO's constant normaliser (arXiv:2503.20783). As in
  verl the sum is *not* divided by the number of sequences; pass
  ``loss_scale_factor = B * L_max`` for Dr. GRPO's (1/G) sum_i form.

``m`` is the response mask, and it is the normaliser: an objective that masks a token (M2PO,
rejection) zeroes that token's loss but the token still counts (M2PO footnote 2). Positions with
m = 0 are selected away with ``torch.where``, so NaN/inf padding there never reaches the result or
its gradient. A batch (or row) with no valid tokens contributes 0, never NaN.

Left out: distributed/global token counts (one process, the whole batch is in memory) and
per-sequence weights other than the mask.
"""

from __future__ import annotations

import math

import torch

from workbench.errors import WorkbenchError

AGGREGATIONS: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)


def check_aggregation(mode: object) -> str:
    """Return ``mode`` if it names an aggregation, else raise a one-line WorkbenchError."""
    if mode not in AGGREGATIONS:
        raise WorkbenchError(f"aggregation={mode!r} is invalid: expected one of {', '.join(AGGREGATIONS)}")
    return mode  # type: ignore[return-value]


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """Reduce ``per_token_loss [B, T]`` to a scalar with ``mask [B, T]`` (bool or 0/1 float).

    ``loss_scale_factor`` is only used by ``seq-mean-token-sum-norm`` (default: T).
    """
    check_aggregation(mode)
    if per_token_loss.dim() != 2 or per_token_loss.shape != mask.shape:
        raise WorkbenchError(
            f"aggregate: per_token_loss shape {tuple(per_token_loss.shape)} must be [B, T] and equal "
            f"the mask shape {tuple(mask.shape)}"
        )
    valid = mask if mask.dtype == torch.bool else mask != 0  # [B, T]
    zero = per_token_loss.new_zeros(())
    loss = torch.where(valid, per_token_loss, zero)  # [B, T]
    if mode == "token-mean":
        n = valid.sum().clamp(min=1).to(loss.dtype)
        return loss.sum() / n
    if mode == "seq-mean-token-sum-norm":
        if loss_scale_factor is None:
            loss_scale_factor = float(max(mask.shape[-1], 1))
        ok = isinstance(loss_scale_factor, (int, float)) and not isinstance(loss_scale_factor, bool)
        if not (ok and math.isfinite(loss_scale_factor) and loss_scale_factor > 0):
            raise WorkbenchError(f"loss_scale_factor={loss_scale_factor!r} is invalid: expected a number > 0")
        return loss.sum() / float(loss_scale_factor)
    counts = valid.sum(dim=-1)  # [B]
    n_rows = (counts > 0).sum().clamp(min=1).to(loss.dtype)
    row_sum = loss.sum(dim=-1)  # [B]
    if mode == "seq-mean-token-sum":
        return row_sum.sum() / n_rows
    # seq-mean-token-mean; rows with no valid token have row_sum 0 and contribute 0.
    row_mean = row_sum / counts.clamp(min=1).to(loss.dtype)  # [B]
    return row_mean.sum() / n_rows

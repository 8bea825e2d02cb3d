"""The objective catalogue: importing this module registers every policy-loss objective.

Each objective is one plain function ``fn(inp: LossInputs, **params) -> LossOutput`` registered in
``OBJECTIVES`` with its paper, summary, parameters and default aggregation. The functions live in
family modules so each stays short:

- ``ppo_family``: ``reinforce``, ``is``, ``ppo_clip`` (presets grpo / dapo), ``dual_clip``, ``sapo``
  (arXiv:1707.06347, 1912.09729, 2402.03300, 2503.14476, 2511.20347).
- ``is_weighted``: ``tis``, ``cispo``, ``topr`` and the reusable ``truncated_is_weight``
  (TIS: fengyao.notion.site/off-policy-rl; arXiv:2506.13585, 2503.14286).
- ``sequence_level``: ``gspo``, ``gspo_token``, ``geo_mean`` (arXiv:2507.18071, 2507.20673).
- ``m2po``: ``m2po`` and the reusable ``m2po_mask`` (arXiv:2510.01161).
- further methods: ``adaptive`` (``bapo``, ``r2vpo``), ``smooth`` (``mhpo``,
  ``ips_alpha``, ``gbpo``), ``rec``, ``covariance`` (``clip_cov``, ``kl_cov``), ``trajectory`` (``tb``),
  ``chord``. Some need ``policy_loss(..., context=...)`` (metadata ``needs``; see ``context``).
- what the peers ship: ``peer_rules`` (``dppo_tv``, ``dppo_kl``, ``opsm``, ``vespo``, ``topr_token``:
  prime-rl / verl / SkyRL / TRL / DeepSeek-V3.2 / Trinity-RFT), imported by the package.
- the preference family: ``preference`` (``online_dpo``, ``ipo``, ``wpo``, ``copg``, ``slic``: pairs
  formed within each group; arXiv:2410.18252, 2310.12036, 2406.11827, 2406.19185, 2305.10425).

Each family's docstring cites its papers and states every objective's per-token loss and gradient;
docs/objectives.md (generated from this registry) lists each objective's parameters. The behaviour
corrections (TIS / MIS / rejection, bypass or decoupled) are not objectives: ``corrections`` applies
them on top of any objective.
"""

from __future__ import annotations

from workbench.steps.reweight import is_weighted, m2po, ppo_family, sequence_level  # noqa: F401  (registration)
from workbench.steps.reweight import adaptive, chord, covariance, rec, smooth, trajectory  # noqa: F401  (seed methods)
from workbench.steps.reweight.is_weighted import truncated_is_weight
from workbench.steps.reweight.m2po import m2po_mask
from workbench.steps.reweight.ppo_family import clipped_surrogate

__all__ = ["clipped_surrogate", "m2po_mask", "truncated_is_weight"]

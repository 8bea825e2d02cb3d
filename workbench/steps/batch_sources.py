"""batch sources: what the update trains on, given the stream of batches the staleness queue delivers.

In context: docs/design.md, "Staleness and the behaviour policy" / "Batch sources". The strategies
themselves are in ``workbench/steps/replay.py``; this module holds the registry and the shared base.

The fixed-lag queue (``buffer.StalenessBuffer``) decides *when* a generated batch reaches the learner
(lag s, sync period n). A batch source then decides *what* the update trains on, from that incoming
batch and what it kept of earlier ones: ``fifo`` (the default) trains on the incoming batch as it is;
replay sources mix in stored groups, down-sampling sources keep a subset. Every consumed sequence keeps
the ``policy_version`` it was generated with, so the loop's ``offpolicy/staleness_*`` are exact for
replayed data too.

A source is a class registered with ``@register_source(name, paper=..., summary=..., params=[...])``;
``Param`` (``reweight.core``) declares each parameter's default, range and ``live`` flag;
``batch_source_params`` is not a live knob, so every parameter is ``live=False`` (fixed for a run;
the shares ``fresh_fraction``, ``reward_priority``, ``off_policy_ratio`` and ``keep_fraction`` could
change between updates without breaking a source's invariants, if they are made knobs). Integer parameters have an ``int`` default.

Shared machinery (``BatchSource``): a store of whole groups (one ``Rollouts`` per group: GRPO
advantages are per group and minibatches split by group), each with the index of the incoming batch
it arrived in; ``max_staleness`` evicts stored groups staler than it (counted in
``buffer/dropped_stale_seqs``); a ``torch.Generator`` of its own (seeded from the run's seed, a stream
apart from the token sampler's); and state as safetensors + JSON (the store, the generator).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from workbench.errors import WorkbenchError, bad_value
from workbench.registry import Registry
from workbench.rollouts import Rollouts, concat
from workbench.steps.reweight.core import Param
from workbench.validate import is_int

BATCH_SOURCES: Registry[type["BatchSource"]] = Registry("batch source")
SEED_OFFSET = 0x5EED_BA7C  # a source's generator stream is apart from the run's token sampler (same seed)
# staleness histogram buckets [low, high) in updates: fixed, so every row of a run has the same columns
HIST_EDGES = (0, 1, 2, 4, 8, 16, 32, 64)


def register_source(name: str, *, paper: str, summary: str, params: list[Param] | tuple[Param, ...] = ()):
    """Decorator registering a ``BatchSource`` subclass; its metadata is checked at import."""
    params = tuple(params)
    if not (isinstance(summary, str) and summary.strip() and isinstance(paper, str)):
        raise WorkbenchError(f"batch source {name!r}: summary must be a non-empty string and paper a string")
    if len({p.name for p in params}) != len(params) or not all(isinstance(p, Param) for p in params):
        raise WorkbenchError(f"batch source {name!r}: params must be Param objects with unique names")

    def deco(cls: type[BatchSource]) -> type[BatchSource]:
        for p in params:
            _check_param(name, p, p.default)  # a default out of its own range fails at import
        cls.name = name
        BATCH_SOURCES.add(name, cls, paper=paper, summary=summary, params=params)
        return cls

    return deco


def validate_source_params(name: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill defaults and check ``params`` of batch source ``name``; one-line ``WorkbenchError`` naming
    the source, the parameter, the value and what is valid."""
    spec = {p.name: p for p in BATCH_SOURCES.meta(name)["params"]}
    params = dict(params or {})
    for key in params:
        if key not in spec:
            raise WorkbenchError(f"batch_source_params: batch source {name!r} has no parameter {key!r}: valid "
                                 f"parameters are {', '.join(sorted(spec)) or '(none)'}")
    return {k: _check_param(name, p, params.get(k, p.default)) for k, p in spec.items()}


def check_source(name: Any, params: Any) -> dict[str, Any]:
    """``RunConfig``'s check of ``batch_source`` / ``batch_source_params``: the filled params."""
    if name not in BATCH_SOURCES:
        raise bad_value("batch_source", name, " | ".join(BATCH_SOURCES.names()))
    return validate_source_params(name, params)


def _check_param(source: str, p: Param, value: Any) -> Any:
    if isinstance(p.default, int) and not isinstance(p.default, bool):  # counts: integers only
        if not is_int(value) or (p.low is not None and value < p.low) or (p.high is not None and value > p.high):
            raise WorkbenchError(f"batch_source_params: {source}.{p.name}={value!r} is invalid: expected an "
                                 f"integer in {p.range_text()}")
        return int(value)
    try:
        return p.check(source, value)
    except WorkbenchError as e:
        raise WorkbenchError(f"batch_source_params: {e}") from None


def make_source(name: str, params: dict[str, Any] | None = None, seed: int = 0) -> "BatchSource":
    """The registered source ``name`` with ``params`` checked and filled."""
    cls = BATCH_SOURCES.get(name)
    return cls(validate_source_params(name, params), seed)


def split_groups(batch: Rollouts) -> list[Rollouts]:
    """One ``Rollouts`` per group of ``batch``, in ascending ``group_id``."""
    return [batch.select(batch.group_id == g) for g in torch.unique(batch.group_id).tolist()]


def join_groups(groups: list[Rollouts]) -> Rollouts:
    """Groups (of any batches) as one batch, re-padded; ``group_id`` renumbered 0..len-1 in order.

    Pad ids are 0 where widths differ: padded positions are masked out of every forward."""
    # each group's ids set to 0: concat offsets part i by i (the running max + 1), so ids are 0..n-1
    return concat([g.with_(group_id=torch.zeros_like(g.group_id)) for g in groups])  # [sum G]


def seq_advantages(batch: Rollouts) -> torch.Tensor:
    """One advantage per sequence: the value itself ([B]) or the masked token mean ([B, T])."""
    adv = batch.advantages
    if adv is None:
        raise WorkbenchError("a down-sampling batch source needs scored batches: advantages=None")
    if adv.dim() == 1:
        return adv.double()  # [B]
    mask = batch.response_mask.double()  # [B, T]
    return (adv.double() * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B]


def staleness_histogram(batch: Rollouts, version: int) -> dict[str, float]:
    """Sequences of ``batch`` per staleness bucket at ``version``: ``buffer/staleness_hist_<lo>_<hi>``
    (inclusive bounds; ``0``, ``1`` for one-wide buckets, ``64_up`` for the last)."""
    stale = version - batch.policy_version  # [B]
    out = {}
    for i, lo in enumerate(HIST_EDGES):
        hi = HIST_EDGES[i + 1] if i + 1 < len(HIST_EDGES) else None
        inside = (stale >= lo) & (stale < hi) if hi is not None else stale >= lo  # [B]
        name = f"{lo}_up" if hi is None else str(lo) if hi == lo + 1 else f"{lo}_{hi - 1}"
        out[f"buffer/staleness_hist_{name}"] = float(inside.sum())
    return out


def rounded_count(fraction: float, n: int) -> int:
    """round(fraction * n) with halves up (Python's round is to even): 0.5 of 3 groups is 2."""
    return int(math.floor(fraction * n + 0.5))


class BatchSource:
    """``fifo`` and the base of every source: ``compose`` returns the incoming batch unchanged.

    Subclasses override ``compose`` (and ``capacity_sequences`` when they store groups)."""

    name = "fifo"

    def __init__(self, params: dict[str, Any], seed: int = 0) -> None:
        self.params = dict(params)
        self.generator = torch.Generator().manual_seed((int(seed) + SEED_OFFSET) % 2**63)
        self.groups: list[Rollouts] = []  # the store, oldest first
        self.arrivals: list[int] = []  # per stored group: the index of the incoming batch it came in
        self.arrived = 0  # incoming batches seen

    def compose(self, incoming: Rollouts, version: int, max_staleness: int, stats: dict[str, float]) -> Rollouts:
        """The batch the update starting at ``version`` trains on; may add ``buffer/`` stats."""
        return incoming

    def capacity_sequences(self, batch_rows: int) -> int:
        """The most sequences the store can hold (for the memory budget); 0 = stores nothing."""
        return 0

    def stored_sequences(self) -> int:
        return sum(len(g) for g in self.groups)

    # ---- shared store operations ----
    def _drop_stale(self, version: int, max_staleness: int, stats: dict[str, float]) -> None:
        if max_staleness < 0:
            return
        keep = [int((version - g.policy_version).max()) <= max_staleness for g in self.groups]
        stats["buffer/dropped_stale_seqs"] += float(sum(len(g) for g, k in zip(self.groups, keep) if not k))
        self.groups = [g for g, k in zip(self.groups, keep) if k]
        self.arrivals = [a for a, k in zip(self.arrivals, keep) if k]

    def _admit(self, groups: list[Rollouts]) -> None:
        self.groups.extend(groups)
        self.arrivals.extend([self.arrived] * len(groups))
        self.arrived += 1

    def _evict_oldest(self, keep: int) -> None:
        """Drop the oldest groups until at most ``keep`` sequences are stored."""
        while self.groups and self.stored_sequences() > keep:
            self.groups.pop(0)
            self.arrivals.pop(0)

    def _pick(self, n: int, k: int) -> list[int]:
        """``k`` of ``range(n)`` uniformly without replacement (the source's generator), ascending."""
        return sorted(torch.randperm(n, generator=self.generator)[:k].tolist())

    # ---- checkpointing: tensors to safetensors, the rest to JSON ----
    def state(self, prefix: str = "source.") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{prefix}generator": self.generator.get_state()}
        metas = []
        for i, g in enumerate(self.groups):
            t, m = g.to_state(prefix=f"{prefix}store{i}.")
            tensors.update(t)
            metas.append(m)
        return tensors, {"name": self.name, "params": dict(self.params), "store": metas,
                         "arrivals": list(self.arrivals), "arrived": self.arrived}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "source.") -> None:
        self.generator.set_state(tensors[f"{prefix}generator"])
        self.groups = [Rollouts.from_state(tensors, m, prefix=f"{prefix}store{i}.") for i, m in enumerate(meta["store"])]
        self.arrivals = [int(a) for a in meta["arrivals"]]
        if len(self.arrivals) != len(self.groups):
            raise WorkbenchError(f"batch source state: {len(self.arrivals)} arrivals for {len(self.groups)} groups")
        self.arrived = int(meta["arrived"])


def source_from_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], prefix: str = "source.") -> BatchSource:
    """The source a checkpoint holds (its name and params validated like the config's)."""
    source = make_source(str(meta["name"]), dict(meta["params"]))
    source.load_state(tensors, meta, prefix)
    return source


register_source("fifo", paper="", summary="the incoming batch as it is: fixed lag / periodic sync only")(BatchSource)

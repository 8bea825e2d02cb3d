"""async_state: the pieces of the asynchronous pipeline's state, and their JSON form.

In context: ``workbench.steps.async_pipeline`` (the simulation that uses them). Sequences and groups
are plain mutable records (the simulation advances them in place); everything here is JSON-able so a
checkpoint restores the pipeline exactly (``to_json`` / ``from_json``). Completed groups are
``Rollouts`` and go to safetensors through the pipeline's ``state()``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from workbench.errors import WorkbenchError, bad_value
from workbench.tasks import Example

EPS = 1e-9  # float slack of the step arithmetic (times are multiples of the decode step)
ADMISSIONS = ("none", "drop", "wait", "pace")
MODES = ("fixed", "async")


@dataclass
class Seq:
    """One sequence (a sample of a group) in a generation slot. Mutable: the simulation extends it."""

    gid: int
    """Group index in start order (0, 1, ...): which prompt it answers."""
    sample: int
    """Its index within the group (0 .. group_size - 1)."""
    start: int
    """Engine step of its first token."""
    factor: float
    """Time per token in decode steps (1 = one token per step; lognormal with async_length_sigma > 0)."""
    tokens: list[int] = field(default_factory=list)
    """Response token ids so far."""
    logps: list[float] = field(default_factory=list)
    """Behaviour log-prob of each token, under the version that generated it."""
    versions: list[int] = field(default_factory=list)
    """Policy version that generated each token."""
    done: bool = False
    """Ended (a stop id or the token budget); the slot frees at ``free_step()``."""

    def tokens_before(self, step: int) -> int:
        """Tokens whose generation starts before engine step ``step``: token j (1-based) starts at step
        start + floor((j - 1) * factor), so they are j <= ceil((step - start) / factor)."""
        return max(0, math.ceil((step - self.start) / self.factor - EPS))

    def free_step(self) -> int:
        """First engine step after the last token's time: start + ceil(len * factor) (at least start + 1)."""
        return self.start + max(1, math.ceil(len(self.tokens) * self.factor - EPS))


@dataclass
class Group:
    """One prompt's ``group_size`` samples, from its first start to the learner (or a drop)."""

    gid: int
    """Index in start order."""
    example: Example
    """The rendered prompt, its reference answer and extras."""
    start_version: int
    """Policy version when its first sample started (the wait rule's check)."""
    assigned: int = 0
    """Samples started so far (the next one goes to the next free slot)."""
    finished: dict[int, Seq] = field(default_factory=dict)
    """Sample index -> its ended sequence."""


@dataclass
class Counters:
    """Cumulative counts of the pipeline (the ``async/`` metrics' totals and the starvation shares)."""

    started_groups: int = 0
    """Groups whose first sample started."""
    trained_groups: int = 0
    """Groups that went into an update."""
    dropped_groups: int = 0
    """Groups discarded as too stale (admission=drop)."""
    dropped_seqs: int = 0
    """Their sequences."""
    trained_answer_chars: int = 0
    """Sum of the reference-answer lengths of trained groups (the difficulty proxy's numerator)."""
    dropped_answer_chars: int = 0
    """The same over dropped groups."""
    waited_slot_s: float = 0.0
    """Slot-seconds idle because admission refused a start."""
    learner_idle_s: float = 0.0
    """Simulated seconds the learner waited for a batch."""


def check_async_config(c: Any) -> None:
    """One-line errors for the async fields of a ``RunConfig`` ``c``, and for settings the pipeline
    does not model when ``staleness_mode`` is async (it replaces the fixed-lag queue and its prefill)."""
    def need(ok: bool, name: str, expected: str) -> None:
        if not ok:
            raise bad_value(name, getattr(c, name), expected)

    def number(name: str, low_ok: bool) -> None:
        v = getattr(c, name)
        need(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or low_ok and v == 0),
             name, "a finite number >= 0" if low_ok else "a finite number > 0 (simulated seconds)")

    need(c.staleness_mode in MODES, "staleness_mode", " | ".join(MODES))
    need(isinstance(c.async_workers, int) and not isinstance(c.async_workers, bool) and c.async_workers >= 0,
         "async_workers", "an integer >= 0 (generation slots; 0 = prompts_per_step * group_size)")
    number("async_decode_step_s", False)
    number("async_update_s", False)
    number("async_length_sigma", True)
    need(c.async_admission in ADMISSIONS, "async_admission", " | ".join(ADMISSIONS))
    need(isinstance(c.async_bound, int) and not isinstance(c.async_bound, bool) and c.async_bound >= 0,
         "async_bound", "an integer >= 0 (the staleness bound of admission drop / wait)")
    need(isinstance(c.async_partial, bool), "async_partial", "true or false")
    if c.staleness_mode != "async":
        return
    why = "with staleness_mode=async"
    need(c.sampler == "transformers", "sampler", f"transformers {why} (the pipeline decodes with the trainer's model)")
    need(c.prefill_batches == 1, "prefill_batches", f"1 {why} (there is no queue prefill)")
    need(not getattr(c, "prefill_to_steps", False), "prefill_to_steps", f"false {why} (there is no queue prefill)")
    need(c.batch_source == "fifo", "batch_source", f"fifo {why}")
    need(c.staleness == 0, "staleness", f"0 {why} (the simulated pipeline sets the lag)")
    need(c.sync_every == 1, "sync_every", f"1 {why} (weights reach generation at every update)")
    need(c.max_staleness == -1, "max_staleness", f"-1 {why} (use async_admission=drop with async_bound)")
    need(c.updates_per_batch == 1, "updates_per_batch", f"1 {why} (one update per generated batch)")
    need(c.num_minibatches == 1, "num_minibatches", f"1 {why} (one update per generated batch)")
    need(not c.filter_zero_variance, "filter_zero_variance", f"false {why} (every finished group enters the queue)")
    # the sampler's numerics knobs act inside TransformersSampler, which the pipeline's decoding does not go through
    for name, off in (("replay_sampling_mask", False), ("sampler_logits_dtype", ""), ("sampler_logit_noise", 0.0)):
        if hasattr(c, name):
            need(getattr(c, name) == off, name, f"{off!r} {why} (the pipeline's decoding does not apply it)")


def example_json(ex: Example) -> dict[str, Any]:
    return {"prompt": ex.prompt, "answer": ex.answer, "extra": dict(ex.extra)}


def example_from(d: dict[str, Any]) -> Example:
    return Example(prompt=str(d["prompt"]), answer=str(d["answer"]), extra=dict(d.get("extra", {})))


def seq_from(d: dict[str, Any]) -> Seq:
    return Seq(gid=int(d["gid"]), sample=int(d["sample"]), start=int(d["start"]), factor=float(d["factor"]),
               tokens=[int(x) for x in d["tokens"]], logps=[float(x) for x in d["logps"]],
               versions=[int(x) for x in d["versions"]], done=bool(d["done"]))


def group_json(g: Group) -> dict[str, Any]:
    return {"gid": g.gid, "example": example_json(g.example), "start_version": g.start_version,
            "assigned": g.assigned, "finished": {str(i): asdict(s) for i, s in g.finished.items()}}


def group_from(d: dict[str, Any]) -> Group:
    return Group(gid=int(d["gid"]), example=example_from(d["example"]), start_version=int(d["start_version"]),
                 assigned=int(d["assigned"]), finished={int(i): seq_from(s) for i, s in d["finished"].items()})


def random_state_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def random_state_from(d: list) -> tuple:
    if not isinstance(d, list) or len(d) != 3:
        raise WorkbenchError(f"async pipeline state: rng state {str(d)[:40]!r} is invalid: expected [version, [ints], gauss]")
    return (int(d[0]), tuple(int(x) for x in d[1]), d[2])


__all__ = ["ADMISSIONS", "Counters", "check_async_config", "EPS", "Group", "MODES", "Seq", "example_from", "example_json", "group_from",
           "group_json", "random_state_from", "random_state_json", "seq_from"]

"""async_pipeline: the staleness a real asynchronous RL system produces (``staleness_mode = "async"``).

In context: docs/design.md, "Staleness and the behaviour policy". Asynchronous systems (AReaL: Fu et
al. 2025, arXiv:2505.24298; PipelineRL: Piche et al. 2025, arXiv:2509.19128) decode while the learner
trains, so the lag is not a fixed number: long responses take longer, rollouts are interrupted and
continued across weight updates (per-token policy versions), and an admission rule bounds the lag.

Model: a discrete-event simulation on a simulated clock, run in lockstep with the real loop.
- W = ``async_workers`` slots decode concurrently; one engine step of ``async_decode_step_s`` seconds
  advances every active slot by one token (by 1 / f tokens for a rollout of lognormal factor f,
  ``async_length_sigma`` > 0). A slot whose sequence ends starts the next sample of the current
  prompt; a new prompt (drawn from the run's ``prompt_rng``, P at a time, as ``Run.sample`` draws
  them) starts only if the admission rule allows.
- The learner needs P = ``prompts_per_step`` whole groups per update (a group enters the queue when
  its G samples are done); it waits (idle) until they are there, then trains for ``async_update_s``.
  The learner holds version k during [E_{k-1}, E_k); an engine step n uses version k when
  E_{k-1} <= n d < E_k. Weights change only at updates, so every token of that window is generated
  for real with the current model before the loop's update k runs: ``pop(k)`` simulates the window
  and returns the batch the learner took at its start S_k.
- ``async_partial`` True: in-flight rollouts continue with each new version (the prefix is prefilled
  again: ``workbench.steps.generate.continuation``); ``token_version`` [B, T] records each token's
  version and ``policy_version`` [B] the first token's. False: a rollout is generated whole at its
  start by the start version and released when its simulated duration has elapsed.
- Admission: none; drop (groups with k - version > ``async_bound`` are discarded when the learner
  takes its batch); wait (AReaL's ``max_head_offpolicyness``: group g may start at version v only if
  floor(g / P) - v <= bound, and the learner takes groups in start order, so each is used at update
  floor(g / P) and its staleness is <= bound); pace (at most P groups start per version).

Not simulated: prefill cost, batching effects on the step time, KV-cache memory limits, network and
weight-transfer time (an update's weights reach every slot at its end).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import torch

from workbench.errors import WorkbenchError
from workbench.policy.chat import render_examples
from workbench.rollouts import Rollouts, concat
from workbench.runs.rundir import atomic_write_text
from workbench.steps.async_state import (EPS, Counters, Group, Seq, example_from, example_json, group_from,
                                         group_json, random_state_from, random_state_json, seq_from)
from workbench.steps.buffer import StalenessBuffer
from workbench.steps.generate.continuation import continue_rows
from workbench.steps.generate.sampler import build_rollouts, encode_prompts
from workbench.steps.prefill import sampling_params
from workbench.steps.replay import make_source, staleness_histogram
from workbench.steps.score import score

STARVED_LOG = 200  # dropped prompts kept (the newest), in the state and <run dir>/async_starved.json
MAX_IDLE_STEPS = 10_000_000  # engine steps one update may wait before the pipeline calls itself stuck


@dataclass
class Ready:
    """A finished, scored group in the learner's queue."""

    ctime: float
    """Simulated time its last sample ended."""
    gid: int
    """Group index in start order."""
    first_version: int
    """Oldest first-token version of its samples (the group's staleness at update k: k - this)."""
    answer_chars: int
    """Length of its reference answer (the difficulty proxy)."""
    rollouts: Rollouts
    """Its G scored rows."""


def make_buffer(config: Any, log: Callable[[str], None] | None = None, run: Any = None) -> Any:
    """What the loop pops batches from: the fixed-lag ``StalenessBuffer`` or, with
    ``staleness_mode = "async"``, an ``AsyncPipeline`` over ``run`` (a ``workbench.loop.Run``)."""
    if config.staleness_mode == "async":
        return AsyncPipeline(config, run)
    return StalenessBuffer.from_config(config, log=log)


class AsyncPipeline:
    """The simulated asynchronous generator + learner queue; ``pop`` has ``StalenessBuffer.pop``'s shape."""

    def __init__(self, config: Any, run: Any) -> None:
        self.config, self.run = config, run
        self.source = make_source(config.batch_source, config.batch_source_params, config.seed)  # fifo
        self.workers = config.async_workers or config.batch_size
        self.d, self.update_s = float(config.async_decode_step_s), float(config.async_update_s)
        self.chunk = max(1, math.floor(self.update_s / self.d + EPS))  # steps that never cross an update's end
        self.clock, self.step = 0.0, 0  # E_{k-1} and the first engine step not yet simulated
        self.slots: list[Seq | None] = [None] * self.workers
        self.slot_free = [0] * self.workers  # engine step an empty slot may start at
        self.groups: dict[int, Group] = {}  # started, not all samples ended
        self.current: int | None = None  # the group whose samples are being handed out
        self.next_gid = 0
        self.pending: list[Any] = []  # drawn prompts not yet started
        self.ready: list[Ready] = []
        self.counters = Counters()
        self.window_started = 0  # groups started in the current version window (pace)
        self.rng = random.Random(config.seed)  # the lognormal duration factors
        self.starved: deque[dict[str, Any]] = deque(maxlen=STARVED_LOG)
        self.stop_ids: torch.Tensor | None = None  # the sampler's stop ids, read at the first pop
        self._prompt_ids: dict[int, list[int]] = {}  # gid -> encoded prompt (recomputed after a resume)

    def __len__(self) -> int:
        return len(self.ready)

    # ---------------------------------------------------------------- the loop's interface
    def pop(self, version: int, *, staleness: int = 0, sync_every: int = 1, max_staleness: int = -1,
            **_: Any) -> tuple[Rollouts, dict[str, float], dict[str, float]]:
        """Simulate the window of version ``version`` and return the batch the learner took at its start,
        the batch's score metrics and the ``async/`` metrics (module doc). The fixed-lag knobs must be off."""
        if staleness != 0 or sync_every != 1 or max_staleness != -1:
            raise WorkbenchError(f"staleness={staleness}, sync_every={sync_every}, max_staleness={max_staleness} are "
                                 f"invalid with staleness_mode=async: expected 0, 1, -1 (async_admission sets the bound)")
        run, cfg, k, t_wall = self.run, self.config, version, time.perf_counter()
        self.params = sampling_params(cfg, run.knobs.applied, run.task)
        if self.stop_ids is None:
            self.stop_ids = getattr(run.sampler, "stop_ids", torch.tensor([int(run.tokenizer.eos_token_id)]))
        self.window = {"dropped": 0, "waited": 0.0, "started": 0, "tokens": 0}
        self.window_started = 0
        a, start, swap, end = self.step, None, 0, 0.0
        while True:
            if start is None:
                t = self._batch_time(k, a * self.d)
                if t is not None:
                    start = max(self.clock, t)
                    end = start + self.update_s
                    swap = max(a, math.ceil(end / self.d - EPS))  # first engine step of version k + 1
            if start is not None and a >= swap:
                break
            if start is None and a - self.step > MAX_IDLE_STEPS:
                raise WorkbenchError(f"staleness_mode=async: no batch after {MAX_IDLE_STEPS} engine steps at update {k}; "
                                     f"expected the admission {cfg.async_admission!r} to let groups finish")
            b = swap if start is not None else a + self.chunk
            self._advance(a, b, k)
            a = b
        batch, stats = self._take(k, start)
        idle = max(0.0, start - self.clock)
        self.counters.learner_idle_s += idle
        self.clock, self.step = end, a
        stats.update(self._metrics(batch, k, idle))
        timing = run._timing
        timing["perf/time_generate"] = timing.get("perf/time_generate", 0.0) + time.perf_counter() - t_wall
        timing["perf/gen_tokens"] = timing.get("perf/gen_tokens", 0.0) + float(self.window["tokens"])
        return batch, self._score_metrics(batch), stats

    # ---------------------------------------------------------------- simulation
    def _advance(self, a: int, b: int, k: int) -> None:
        """Generate every token whose engine step lies in [a, b) (all of version k), starting sequences in
        slots as they free up, earliest first (admission counts depend on the order)."""
        if self.config.async_partial:
            self._extend([i for i, s in enumerate(self.slots) if s is not None and not s.done], b, k)
        while True:
            free = sorted((max(self._free_step(i), a), i) for i, s in enumerate(self.slots) if s is None or s.done)
            free = [(e, i) for e, i in free if e < b]
            if not free:
                return
            e = free[0][0]
            started = []
            for _, i in (x for x in free if x[0] == e):
                seq = self._next_seq(e, k)
                if seq is None:  # refused: idle until the next window boundary (where the version may change)
                    self.window["waited"] += (b - e) * self.d
                    self.counters.waited_slot_s += (b - e) * self.d
                    self.slots[i], self.slot_free[i] = None, b
                else:
                    self.slots[i] = seq
                    started.append(i)
            if started:
                self._extend(started, b if self.config.async_partial else None, k)

    def _free_step(self, i: int) -> int:
        s = self.slots[i]
        return s.free_step() if s is not None else self.slot_free[i]

    def _admit(self, k: int) -> bool:
        """May a new group start now (the version window of ``k``)? The admission rule of the module doc."""
        rule, cfg = self.config.async_admission, self.config
        if rule == "pace":
            return self.window_started < cfg.prompts_per_step
        if rule == "wait":
            return self.next_gid // cfg.prompts_per_step - k <= cfg.async_bound
        return True

    def _next_seq(self, step: int, k: int) -> Seq | None:
        """The next sample to start at engine ``step``: of the current group, or of a new prompt (if admitted)."""
        cfg, run = self.config, self.run
        group = self.groups.get(self.current) if self.current is not None else None
        if group is None or group.assigned >= cfg.group_size:
            if not self._admit(k):
                return None
            if not self.pending:  # P prompts per draw: the stream Run.sample reads
                self.pending = list(render_examples(run.tokenizer, run.task.sample(run.prompt_rng, cfg.prompts_per_step),
                                                    run.chat_template))
            group = Group(gid=self.next_gid, example=self.pending.pop(0), start_version=k)
            self.groups[group.gid], self.current = group, group.gid
            self.next_gid += 1
            self.counters.started_groups += 1
            self.window_started += 1
        sample = group.assigned
        group.assigned += 1
        factor = self.rng.lognormvariate(0.0, cfg.async_length_sigma) if cfg.async_length_sigma > 0 else 1.0
        self.window["started"] += 1
        return Seq(gid=group.gid, sample=sample, start=step, factor=factor)

    def _ids(self, gid: int) -> list[int]:
        if gid not in self._prompt_ids:
            ids, mask = encode_prompts(self.run.tokenizer, [self.groups[gid].example.prompt])  # [1, P]
            self._prompt_ids[gid] = ids[0][mask[0].bool()].tolist()
        return self._prompt_ids[gid]

    def _extend(self, slots: list[int], b: int | None, k: int) -> None:
        """Decode the sequences in ``slots`` with the current weights (version k): the tokens that start
        before engine step ``b``, or the whole rollout when ``b`` is None (async_partial=False)."""
        max_new, run = self.params.max_new_tokens, self.run
        seqs = [self.slots[i] for i in slots]
        budgets = [max_new - len(s.tokens) if b is None else max(0, min(s.tokens_before(b), max_new) - len(s.tokens))
                   for s in seqs]
        rows = [self._ids(s.gid) + s.tokens for s in seqs]
        made = continue_rows(run.model, rows, budgets, self.params, generator=run.generator, stop_ids=self.stop_ids,
                             pad_id=int(run.tokenizer.pad_token_id))
        for s, (tokens, logps, stopped) in zip(seqs, made):
            s.tokens += tokens
            s.logps += logps
            s.versions += [k] * len(tokens)
            self.window["tokens"] += len(tokens)
            if tokens and (stopped or len(s.tokens) >= max_new):
                s.done = True
                self._finish(s)

    def _finish(self, seq: Seq) -> None:
        """An ended sample; its group's last one scores the group and queues it at that sample's end time."""
        cfg, run = self.config, self.run
        group = self.groups[seq.gid]
        group.finished[seq.sample] = seq
        if len(group.finished) < cfg.group_size:
            return
        seqs = [group.finished[i] for i in range(cfg.group_size)]
        width = max(len(s.tokens) for s in seqs)
        resp = torch.full((len(seqs), width), int(run.tokenizer.pad_token_id), dtype=torch.long)  # [G, T]
        mask = torch.zeros((len(seqs), width))  # [G, T]
        logps = torch.zeros((len(seqs), width))  # [G, T]
        versions = torch.zeros((len(seqs), width), dtype=torch.long)  # [G, T]
        for r, s in enumerate(seqs):
            n = len(s.tokens)
            resp[r, :n], mask[r, :n] = torch.tensor(s.tokens), 1.0
            logps[r, :n], versions[r, :n] = torch.tensor(s.logps), torch.tensor(s.versions)
        ids = torch.tensor([self._ids(group.gid)])  # [1, P]
        rollouts = build_rollouts([group.example], cfg.group_size, ids, torch.ones_like(ids), resp, mask, logps, 0,
                                  run.tokenizer)
        rollouts = rollouts.with_(policy_version=versions[:, 0].clone(), token_version=versions)  # [G], [G, T]
        rollouts, _ = score(rollouts, list(cfg.rewards), advantage=cfg.advantage, filter_zero_variance=False,
                            advantage_params=cfg.advantage_params)
        ctime = max(s.free_step() for s in seqs) * self.d
        self.ready.append(Ready(ctime, group.gid, int(versions[:, 0].min()), len(group.example.answer), rollouts))
        del self.groups[group.gid]
        self._prompt_ids.pop(group.gid, None)

    # ---------------------------------------------------------------- the learner
    def _stale(self, entry: Ready, k: int) -> bool:
        return self.config.async_admission == "drop" and k - entry.first_version > self.config.async_bound

    def _chosen(self, k: int, horizon: float) -> list[Ready] | None:
        """The P groups the learner would take at ``horizon`` (None: not there yet). wait: the next P in
        start order; else the first P by end time that are not too stale."""
        p = self.config.prompts_per_step
        if self.config.async_admission == "wait":
            want = set(range(self.counters.trained_groups, self.counters.trained_groups + p))
            got = [e for e in self.ready if e.gid in want and e.ctime <= horizon + EPS]
            return sorted(got, key=lambda e: e.gid) if len(got) == p else None
        there = sorted((e for e in self.ready if e.ctime <= horizon + EPS), key=lambda e: (e.ctime, e.gid))
        fresh = [e for e in there if not self._stale(e, k)]
        return fresh[:p] if len(fresh) >= p else None

    def _batch_time(self, k: int, horizon: float) -> float | None:
        chosen = self._chosen(k, horizon)
        return None if chosen is None else max(e.ctime for e in chosen)

    def _take(self, k: int, start: float) -> tuple[Rollouts, dict[str, float]]:
        """The learner at ``start``: drop the too-stale groups there (drop), take its P groups."""
        for e in [e for e in self.ready if e.ctime <= start + EPS and self._stale(e, k)]:
            self.ready.remove(e)
            self.counters.dropped_groups += 1
            self.counters.dropped_seqs += len(e.rollouts)
            self.counters.dropped_answer_chars += e.answer_chars
            self.window["dropped"] += len(e.rollouts)
            self.starved.append({"update": k, "prompt": e.rollouts.prompts[0], "answer": e.rollouts.answers[0],
                                 "staleness": k - e.first_version})
        if self.window["dropped"] and self.run.dir is not None:
            atomic_write_text(self.run.dir.path / "async_starved.json", json.dumps(list(self.starved), indent=1))
        chosen = self._chosen(k, start)
        for e in chosen:
            self.ready.remove(e)
            self.counters.trained_groups += 1
            self.counters.trained_answer_chars += e.answer_chars
        return concat([e.rollouts for e in chosen], pad_id=int(self.run.tokenizer.pad_token_id)), {}

    def _score_metrics(self, batch: Rollouts) -> dict[str, float]:
        """The batch's score metrics as ``Run.sample`` reports them (its advantages were made per group)."""
        cfg = self.config
        return score(batch, list(cfg.rewards), advantage=cfg.advantage, advantage_params=cfg.advantage_params)[1]

    def _metrics(self, batch: Rollouts, k: int, idle: float) -> dict[str, float]:
        c, w = self.counters, self.window
        hist = {key.replace("buffer/", "async/"): v for key, v in staleness_histogram(batch, k).items()}
        stale = (k - batch.policy_version).float()  # [B]
        mask = batch.response_mask.bool()  # [B, T]
        token_stale = (k - batch.token_version)[mask].double()  # [N real tokens]
        # a sequence is in flight until its simulated end (async_partial=False: generated whole, still running)
        in_flight = sum(1 for s in self.slots if s is not None and (not s.done or s.free_step() > self.step))
        out = {**hist, "async/staleness_mean": float(stale.mean()), "async/staleness_max": float(stale.max()),
               "async/token_staleness_mean": float(token_stale.mean()) if len(token_stale) else 0.0,
               "async/dropped_seqs": float(w["dropped"]), "async/dropped_seqs_total": float(c.dropped_seqs),
               "async/waited_slot_s": float(w["waited"]), "async/learner_idle_s": float(idle),
               "async/clock_s": float(self.clock), "async/in_flight": float(in_flight),
               "async/ready_groups": float(len(self.ready)), "async/started_seqs": float(w["started"]),
               "async/started_groups": float(self.window_started),
               "async/gen_tokens": float(w["tokens"]),
               "async/untrained_frac": 1.0 - c.trained_groups / max(1, c.started_groups),
               "async/starved_frac": c.dropped_groups / max(1, c.started_groups)}
        if c.trained_groups:
            out["async/difficulty_trained"] = c.trained_answer_chars / c.trained_groups
        if c.dropped_groups:
            out["async/difficulty_dropped"] = c.dropped_answer_chars / c.dropped_groups
        return out

    # ---------------------------------------------------------------- checkpointing
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (the queued groups) and JSON, in the shape ``StalenessBuffer.load_state`` also reads
        (an empty fixed-lag queue beside the ``async`` entry), so the checkpoint's checks apply unchanged."""
        tensors, ready = {}, []
        for i, e in enumerate(self.ready):
            t, m = e.rollouts.to_state(prefix=f"async.ready{i}.")
            tensors.update(t)
            ready.append({"ctime": e.ctime, "gid": e.gid, "first_version": e.first_version,
                          "answer_chars": e.answer_chars, "rollouts": m})
        src_tensors, src_meta = self.source.state(prefix="source.")
        tensors.update(src_tensors)
        pipeline = {
            "clock": self.clock, "step": self.step, "next_gid": self.next_gid, "current": self.current,
            "slots": [None if s is None else vars(s) for s in self.slots], "slot_free": list(self.slot_free),
            "groups": [group_json(g) for g in self.groups.values()], "pending": [example_json(x) for x in self.pending],
            "ready": ready, "counters": vars(self.counters), "rng": random_state_json(self.rng.getstate()),
            "starved": list(self.starved)}
        return tensors, {"queue": [], "pops_since_sync": 0, "synced_once": False, "carried": {}, "source": src_meta,
                         "async": json.loads(json.dumps(pipeline))}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore ``state()``; everything is parsed before anything changes."""
        p = meta.get("async")
        if not isinstance(p, dict):
            raise WorkbenchError("buffer.json holds no asynchronous pipeline state: expected a checkpoint of a "
                                 "staleness_mode=async run")
        try:
            slots = [None if s is None else seq_from(s) for s in p["slots"]]
            ready = [Ready(float(e["ctime"]), int(e["gid"]), int(e["first_version"]), int(e["answer_chars"]),
                           Rollouts.from_state(tensors, e["rollouts"], prefix=f"async.ready{i}."))
                     for i, e in enumerate(p["ready"])]
            groups = [group_from(g) for g in p["groups"]]
            pending = [example_from(x) for x in p["pending"]]
            rng_state = random_state_from(p["rng"])
            random.Random().setstate(rng_state)  # a malformed state fails here, before anything changed
            counters = Counters(**p["counters"])
            scalars = (float(p["clock"]), int(p["step"]), int(p["next_gid"]), [int(x) for x in p["slot_free"]])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise WorkbenchError(f"buffer.json: the asynchronous pipeline state is damaged ({type(e).__name__}: "
                                 f"{str(e)[:80]}): expected the state() of an AsyncPipeline") from None
        if len(slots) != self.workers or len(scalars[3]) != self.workers:
            raise WorkbenchError(f"buffer.json: {len(slots)} generation slots, the config's async_workers gives "
                                 f"{self.workers}: expected the same")
        self.clock, self.step, self.next_gid, self.slot_free = scalars
        self.current = None if p.get("current") is None else int(p["current"])
        self.slots, self.groups, self.pending, self.ready = slots, {g.gid: g for g in groups}, pending, ready
        self.counters = counters
        self.rng.setstate(rng_state)
        self.starved = deque(p.get("starved", []), maxlen=STARVED_LOG)
        self._prompt_ids = {}


__all__ = ["AsyncPipeline", "Ready", "make_buffer"]

"""The staleness queue: exact lag, sync periods, live changes, drops, checkpoint round trip, the memory
budget (its size estimate against tracemalloc, a refusal before the queue is filled)."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.policy.model import TINY_MODEL, ModelConfig, build_model
from workbench.policy.tokenizer import build_char_tokenizer
from workbench.rollouts import Rollouts
from workbench.steps.buffer import BUDGET_ENV, StalenessBuffer, batch_nbytes
from workbench.steps.reweight import mismatch


def _batch(version: int, rows: int = 4) -> Rollouts:
    return Rollouts(
        prompt_ids=torch.ones(rows, 2, dtype=torch.long), prompt_mask=torch.ones(rows, 2, dtype=torch.long),
        response_ids=torch.ones(rows, 3, dtype=torch.long), response_mask=torch.ones(rows, 3),
        behavior_logprobs=torch.full((rows, 3), -0.5), policy_version=torch.full((rows,), version),
        group_id=torch.arange(rows) // 2, prompts=["p"] * rows, completions=["c"] * rows,
        answers=["a"] * rows, extras=[{}] * rows)


class Driver:
    """Plays the loop: one pop per update, ``version`` = updates applied so far."""

    def __init__(self):
        self.buffer = StalenessBuffer()
        self.version = 0
        self.generated_at: list[int] = []

    def produce(self):
        self.generated_at.append(self.version)
        return _batch(self.version), {"reward/mean": float(self.version)}

    def update(self, staleness=0, sync_every=1, max_staleness=-1):
        batch, score, stats = self.buffer.pop(self.version, staleness=staleness, sync_every=sync_every,
                                              max_staleness=max_staleness, produce=self.produce)
        consumed = int(batch.policy_version[0])
        assert score["reward/mean"] == consumed  # the score metrics travel with their batch
        self.version += 1
        return consumed, stats


@pytest.mark.parametrize("s", [0, 1, 3, 16])
def test_fixed_lag_is_exact_once_full_and_ramps_before(s):
    d = Driver()
    consumed = [d.update(staleness=s)[0] for _ in range(3 * s + 5)]
    for k, v in enumerate(consumed):
        # Before the queue is full (k < s) the missing batches came from theta_0: staleness k.
        assert v == max(0, k - s), (k, v)
    # s + 1 batches were generated up front by theta_0, then exactly one per update.
    assert d.generated_at[: s + 1] == [0] * (s + 1)
    assert d.generated_at[s + 1:] == list(range(1, len(consumed)))
    assert len(d.buffer) == s  # memory is s batches of ids/log-probs, no model copies


def test_sync_every_cycles_staleness():
    d = Driver()
    stale = [d.version - d.update(sync_every=4)[0] for _ in range(12)]
    assert stale == [0, 1, 2, 3] * 3
    # all four batches of a period were generated at its sync point
    assert d.generated_at == [0] * 4 + [4] * 4 + [8] * 4


def test_lag_plus_sync_period():
    d = Driver()
    stale = [d.version - d.update(staleness=2, sync_every=4)[0] for _ in range(14)]
    assert stale[6:] == [2, 3, 4, 5, 2, 3, 4, 5]
    assert stale[:6] == [0, 1, 2, 3, 4, 5]


def test_raising_lag_live_ramps_and_lowering_it_jumps():
    d = Driver()
    for _ in range(5):
        d.update(staleness=2)
    ks = []
    for _ in range(9):  # raise to 6: the queued batches drain, then the lag grows by one per update
        k = d.version
        ks.append(k - d.update(staleness=6)[0])
    assert ks == [2, 2, 2, 3, 4, 5, 6, 6, 6]
    consumed, stats = d.update(staleness=1)  # lower to 1: takes effect at once
    assert d.version - 1 - consumed == 1
    assert stats["buffer/dropped_batches"] == 5


def test_max_staleness_drops_and_counts():
    d = Driver()
    for _ in range(4):
        d.update(staleness=3)
    batch, _, stats = d.buffer.pop(d.version + 2, staleness=3, sync_every=1, max_staleness=4, produce=d.produce)
    # the popped batch (version 1) is 5 stale at version 6 > 4: dropped, the next one (version 2) used
    assert int(batch.policy_version[0]) == 2
    assert stats["buffer/dropped_stale_seqs"] == 4


def test_state_round_trip():
    d = Driver()
    for _ in range(3):
        d.update(staleness=4)
    tensors, meta = d.buffer.state()
    other = StalenessBuffer()
    other.load_state(tensors, meta)
    assert len(other) == len(d.buffer)
    for (a, ma), (b, mb) in zip(d.buffer.queue, other.queue):
        assert torch.equal(a.policy_version, b.policy_version) and ma == mb
        assert torch.equal(a.behavior_logprobs, b.behavior_logprobs) and a.prompts == b.prompts


# ------------------------------------------------------------------------------ the memory budget
def _tiny_run(**kw) -> Run:
    """A run of the default config (addition, 32 prompts x 8 samples unless overridden) on the tiny model."""
    tok = build_char_tokenizer()
    cfg = RunConfig(out_dir="", threads=1, **kw)
    return Run(cfg, model=build_model(ModelConfig(**TINY_MODEL), tok, seed=0), tokenizer=tok, log=lambda s: None)


def _storage_bytes(entries) -> int:
    """Bytes of the distinct tensor storages of queued entries: torch allocates them outside the Python
    heap, so tracemalloc does not see them."""
    storages = {}
    for batch, _ in entries:
        for value in vars(batch).values():
            if isinstance(value, torch.Tensor):
                s = value.untyped_storage()
                storages[(s.data_ptr(), s.nbytes())] = s.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("shape, n", [((32, 8), 6), ((4, 4), 16)])
def test_batch_nbytes_bounds_the_memory_a_queued_batch_holds(shape, n):
    prompts, group = shape
    run = _tiny_run(prompts_per_step=prompts, group_size=group, staleness=n)

    def produce():  # what the loop queues at staleness > 0: a scored batch with log pi_gen attached
        batch, score_metrics = run.sample()
        return mismatch.attach_trainer_logprobs(run.model, batch, run.config.temperature), score_metrics

    for _ in range(2):  # first calls fill lazy caches (tokenizer, torch ops): not the queue's memory
        produce()
    buffer = StalenessBuffer()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        popped = buffer.pop(0, staleness=n, sync_every=1, max_staleness=-1, produce=produce)
        del popped  # what stays is the queue: n batches with their score metrics
        gc.collect()
        python_bytes = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(buffer) == n
    entries = list(buffer.queue)
    assert entries[0][0].trainer_logprobs is not None and len(entries[0][0]) == prompts * group  # as queued by a run
    measured = (python_bytes + _storage_bytes(entries)) / n
    estimated = sum(batch_nbytes(b, m) for b, m in entries) / n
    assert measured <= estimated <= 2 * measured, (estimated, measured)


def test_a_huge_lag_over_a_tiny_budget_is_refused_after_one_batch(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "1e-6")  # 1000 bytes
    made = []

    def produce():
        made.append(_batch(0, rows=64))
        return made[-1], {"reward/mean": 0.0}

    lag = 10**9
    with pytest.raises(WorkbenchError) as e:
        StalenessBuffer().pop(0, staleness=lag, sync_every=1, max_staleness=-1, produce=produce)
    assert len(made) == 1  # refused on the first batch, not after a billion
    per = batch_nbytes(made[0], {"reward/mean": 0.0})
    text = str(e.value)
    assert "\n" not in text
    assert f"keeps {lag + 1} batches of ~{per / 1e6:.2f} MB ({per} bytes each)" in text
    assert f"= {per * (lag + 1)} bytes), over the 1e-06 GB budget ({BUDGET_ENV})" in text


def test_the_budget_is_the_boundary(monkeypatch):
    batch, score = _batch(0), {"reward/mean": 0.0}
    per = batch_nbytes(batch, score)
    for gb, refused in (((per * 4 + 0.5) / 1e9, False), ((per * 4 - 0.5) / 1e9, True)):  # 4 batches: 3 + 1
        monkeypatch.setenv(BUDGET_ENV, repr(gb))
        buffer = StalenessBuffer()
        try:
            buffer.pop(0, staleness=3, sync_every=1, max_staleness=-1, produce=lambda: (_batch(0), dict(score)))
        except WorkbenchError:
            assert refused
        else:
            assert not refused and len(buffer) == 3

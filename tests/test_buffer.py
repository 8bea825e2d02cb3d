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
from workbench.steps.buffer import BUDGET_ENV, StalenessBuffer, SyncStopped, batch_nbytes
from workbench.steps.reweight import mismatch
from workbench.steps.score import score


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


# ------------------------------------------------------------------------------ batched prefill
def _prefill_run(prefill_batches: int, **kw) -> tuple[Run, list[int]]:
    """A tiny run (4 prompts x 4 samples, a partial-credit reward so rewards vary) whose sampler records
    how many prompts each generate call got."""
    kw = {"prompts_per_step": 4, "group_size": 4, "staleness": 9, "rewards": (("format", 1.0, {"value": 1.0}),),
          **kw}
    run = _tiny_run(prefill_batches=prefill_batches, **kw)
    run.initial_accuracy = 0.0  # skip the held-out evaluation: not what is tested
    calls: list[int] = []
    generate = run.sampler.generate

    def counting_generate(examples, *args, **kwargs):
        calls.append(len(examples))
        return generate(examples, *args, **kwargs)

    run.sampler.generate = counting_generate
    return run, calls


def _prefill(run: Run) -> list[tuple[Rollouts, dict[str, float]]]:
    """The batches of the first sync at theta_0 (the one popped by update 0 first), before any update."""
    popped = []
    pop = run.buffer.pop

    def recording_pop(*args, **kwargs):
        popped.append(pop(*args, **kwargs))
        return popped[-1]

    run.buffer.pop = recording_pop  # type: ignore[method-assign]
    run.step()
    popped = [(batch, score_metrics) for batch, score_metrics, _ in popped]
    return popped + list(run.buffer.queue)


def test_batched_prefill_queues_the_same_prompts_and_versions_in_fewer_generate_calls():
    one, calls_one = _prefill_run(1)
    four, calls_four = _prefill_run(4)
    a, b = _prefill(one), _prefill(four)
    assert len(a) == len(b) == 10  # staleness 9: 9 + 1 batches at theta_0
    assert calls_one == [4] * 10
    assert calls_four == [4, 16, 16, 4]  # one batch measured for the budget, then 4 per call, the rest
    for (x, _), (y, _) in zip(a, b):
        assert x.prompts == y.prompts and x.answers == y.answers  # the prompt stream's order, batch by batch
        assert torch.equal(x.policy_version, y.policy_version) and int(y.policy_version.max()) == 0
        assert torch.equal(x.group_id, y.group_id)  # 0..3, each a whole group of 4, as if generated alone
        assert torch.equal(x.prompt_ids, y.prompt_ids) and torch.equal(x.prompt_mask, y.prompt_mask)  # same padding
        widest = int(y.response_mask.sum(1).max())
        assert y.response_ids.shape[1] == widest  # the other batches' response padding is cut
    assert one.rows[0]["buffer/generated_batches"] == four.rows[0]["buffer/generated_batches"] == 10


def test_each_prefilled_batch_is_scored_on_its_own_rows():
    run, _ = _prefill_run(4)
    batches = _prefill(run)
    for batch, metrics in batches:
        # independent reference: the format reward of digit-only answers, GRPO in float64 per group
        rewards = torch.tensor([1.0 if c.strip() and c.strip().isdigit() else 0.0 for c in batch.completions],
                               dtype=torch.float64)  # [B]
        by_group = rewards.view(4, 4)  # [groups, G]: rows are grouped by prompt, in order
        mean = by_group.mean(1, keepdim=True)
        std = by_group.std(1, keepdim=True)  # unbiased, as GRPO's estimator documents
        expected = ((by_group - mean) / (std + 1e-6)).view(-1)  # [B]
        assert torch.allclose(batch.rewards.double(), rewards, rtol=0, atol=0)
        assert torch.allclose(batch.advantages.double(), expected, rtol=1e-6, atol=1e-6)
        assert metrics["reward/mean"] == pytest.approx(float(rewards.mean()), rel=1e-9, abs=1e-12)
        lengths = batch.response_mask.sum(1).double()  # [B]
        assert metrics["reward/response_len_max"] == float(lengths.max())
        # and exactly a separate score() call on the batch's rows
        rescored, again = score(batch.with_(rewards=None, advantages=None), list(run.config.rewards),
                                advantage=run.config.advantage)
        assert torch.equal(rescored.advantages, batch.advantages) and again == metrics
    assert len({m["reward/mean"] for _, m in batches}) > 1  # metrics per batch, not one for the whole call


def test_prefilled_batches_carry_their_own_log_pi_gen():
    run, _ = _prefill_run(4, mismatch_sample=2)
    reference = build_model(ModelConfig(**TINY_MODEL), build_char_tokenizer(), seed=0)  # theta_0 again
    for batch, _ in _prefill(run):
        rows = mismatch.sampled_rows(batch, 2, run.config.seed)  # [8] the 2 groups drawn for this batch
        assert rows is not None and len(rows) == 8
        measured = ~torch.isnan(batch.trainer_logprobs).all(1)  # [B]
        assert measured.nonzero(as_tuple=True)[0].tolist() == rows.tolist()
        expected = mismatch.frozen_logprobs(reference, batch.select(rows), run.config.temperature).double()  # [8, T]
        assert torch.allclose(batch.trainer_logprobs[rows].double(), expected, rtol=1e-6, atol=1e-6)


def test_batched_prefill_is_deterministic_for_a_seed():
    x, y = (_prefill(_prefill_run(4)[0]) for _ in range(2))
    for (a, ma), (b, mb) in zip(x, y):
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.behavior_logprobs, b.behavior_logprobs)
        assert torch.equal(a.advantages, b.advantages) and ma == mb


class ChunkDriver(Driver):
    """A driver whose ``produce_batches(n)`` makes n batches per call, recording each call's size."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []
        self.lines: list[str] = []
        self.buffer = StalenessBuffer(log=self.lines.append)

    def produce_batches(self, n):
        self.calls.append(n)
        return [self.produce() for _ in range(n)]

    def pop(self, staleness, prefill_batches, should_stop=None):
        return self.buffer.pop(self.version, staleness=staleness, sync_every=1, max_staleness=-1,
                               produce=self.single, produce_batches=self.produce_batches,
                               prefill_batches=prefill_batches, should_stop=should_stop)

    def single(self):
        self.calls.append(1)
        return self.produce()


def test_prefill_batches_1_never_calls_the_batched_producer():
    d = ChunkDriver()
    for _ in range(3):
        d.pop(staleness=5, prefill_batches=1)
        d.version += 1
    assert d.calls == [1] * 8  # 6 up front, then one per update


def test_a_stop_lands_between_generate_calls_and_the_sync_resumes_there():
    d = ChunkDriver()
    asked = []
    with pytest.raises(SyncStopped):
        d.pop(staleness=20, prefill_batches=8, should_stop=lambda: asked.append(1) or len(asked) == 2)
    assert d.calls == [1, 8] and len(d.buffer) == 9  # stopped after the second call
    batch, _, stats = d.pop(staleness=20, prefill_batches=8)
    assert d.calls == [1, 8, 8, 4] and len(d.buffer) == 20  # the same calls an unstopped sync makes
    assert stats["buffer/generated_batches"] == 21  # the stopped pop's count carried over
    # a progress line after a call that crosses a tenth of the way (3 of 21, then 2 of the 12 left)
    assert [" ".join(line.split()[1:3]) for line in d.lines] == [
        "generating 21", "9/21 batches", "generating 12", "8/12 batches", "12/12 batches"]


def test_batched_prefill_is_refused_over_budget_before_a_large_call(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "1e-6")
    d = ChunkDriver()
    with pytest.raises(WorkbenchError, match="over the 1e-06 GB budget"):
        d.pop(staleness=10**9, prefill_batches=16)
    assert d.calls == [1]  # the measured first batch, never a call of 16


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "4", None])
def test_bad_prefill_batches_is_a_one_line_error(value):
    with pytest.raises(WorkbenchError) as e:
        RunConfig(prefill_batches=value)
    text = str(e.value)
    assert "\n" not in text and "prefill_batches" in text and repr(value) in text, text
    if isinstance(value, int) and not isinstance(value, bool):
        assert "an integer >= 1" in text
    with pytest.raises(WorkbenchError, match=r"^prefill_batches=.* is invalid: expected an integer >= 1"):
        ChunkDriver().pop(staleness=3, prefill_batches=value)


def test_a_batched_producer_returning_the_wrong_count_is_a_one_line_error():
    buffer = StalenessBuffer()
    with pytest.raises(WorkbenchError, match=r"^produce_batches\(4\) returned 3: expected a list of 4"):
        buffer.pop(0, staleness=8, sync_every=1, max_staleness=-1, produce=lambda: (_batch(0), {}),
                   produce_batches=lambda n: [(_batch(0), {})] * (n - 1), prefill_batches=4)

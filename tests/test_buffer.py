"""The staleness queue: exact lag, sync periods, live changes, drops, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from workbench.steps.buffer import StalenessBuffer
from workbench.rollouts import Rollouts


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

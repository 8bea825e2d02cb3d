"""The simulated asynchronous pipeline (staleness_mode=async): the lag against its closed form on
constant lengths, determinism, exact resume, per-token versions and their log-probs, admission
bounds, and the settings it refuses."""

from __future__ import annotations

import copy
import json
import math

import polars as pl
import pytest
import torch

from workbench.config import RunConfig
from workbench.errors import WorkbenchError
from workbench.loop import Run
from workbench.policy.model import build_model
from workbench.rollouts import concat

SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=2,
             group_size=2, eval_every=50, eval_size=16, lr=1e-3, seed=3, staleness_mode="async")


def make_run(tokenizer, tiny_model_config, tmp_path=None, no_stops=False, **overrides):
    cfg = RunConfig(**{**SMALL, "out_dir": str(tmp_path) if tmp_path else "", "run_name": "r", **overrides})
    run = Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)
    if no_stops:  # every response is exactly max_new_tokens long: the constant-length case
        run.buffer.stop_ids = torch.tensor([-1])
    return run


def deterministic(df: pl.DataFrame) -> pl.DataFrame:
    return df.select([c for c in df.columns if not c.startswith("perf/")])


def test_constant_lengths_staleness_matches_the_closed_form(tokenizer, tiny_model_config):
    # W = B = 4 slots, L = 3 tokens, d = 0.25 s: a wave of one batch ends every L d = 0.75 s; wave m
    # starts at m L d. The learner takes wave 0 at S_0 = 0.75 and, being slower (U = 1 s), is never idle
    # again: E_k = 1.75 + k. A step at time t uses version #{k: E_k <= t} = max(0, floor(t - 0.75)),
    # so batch k = wave k starts at version max(0, floor(0.75 k - 0.75)) and its staleness grows.
    run = make_run(tokenizer, tiny_model_config, no_stops=True, max_new_tokens=3, async_decode_step_s=0.25,
                   async_update_s=1.0)
    df = run.run(9)

    def version_at(t):
        return max(0, math.floor(t - 0.75 + 1e-9))

    expected = [k - version_at(0.75 * k) for k in range(9)]
    assert expected == [0, 1, 2, 2, 2, 2, 3, 3, 3]
    assert df["async/staleness_mean"].to_list() == expected
    assert df["offpolicy/staleness_max"].to_list() == expected  # every row of a wave starts together
    assert df["async/clock_s"].to_list() == [1.75 + k for k in range(9)]
    assert df["async/learner_idle_s"].to_list() == [0.75] + [0.0] * 8
    token = [k - sum(version_at(0.25 * (3 * k + i)) for i in range(3)) / 3 for k in range(9)]
    assert df["async/token_staleness_mean"].to_list() == pytest.approx(token, abs=1e-9)
    assert df["async/staleness_hist_2_3"].to_list() == [4.0 * (s in (2, 3)) for s in expected]
    # Generation slower than learning (U = 0.5 s < L d): E_k = 0.75 (k + 1) + 0.5, wave m starts at
    # version m - 1 and the learner waits 0.25 s each update: staleness 1 from update 1 on.
    slow = make_run(tokenizer, tiny_model_config, no_stops=True, max_new_tokens=3, async_decode_step_s=0.25,
                    async_update_s=0.5).run(6)
    assert slow["async/staleness_mean"].to_list() == [0, 1, 1, 1, 1, 1]
    assert slow["async/learner_idle_s"].to_list() == [0.75] + [0.25] * 5


def test_same_seed_same_metrics(tokenizer, tiny_model_config):
    kw = dict(async_length_sigma=1.0, async_admission="drop", async_bound=1, async_workers=6,
              async_decode_step_s=0.1, async_update_s=0.5)
    a = make_run(tokenizer, tiny_model_config, **kw).run(5)
    b = make_run(tokenizer, tiny_model_config, **kw).run(5)
    assert deterministic(a).equals(deterministic(b))
    c = make_run(tokenizer, tiny_model_config, **{**kw, "seed": 4}).run(5)
    assert not deterministic(a).equals(deterministic(c))


@pytest.mark.parametrize("partial", [True, False])
def test_resume_gives_the_uninterrupted_metrics(tokenizer, tiny_model_config, tmp_path, partial):
    kw = dict(async_length_sigma=0.8, async_workers=5, async_decode_step_s=0.1, async_update_s=0.3,
              async_partial=partial, checkpoint_every=2)
    full = make_run(tokenizer, tiny_model_config, tmp_path / "a", **kw).run(6)
    first = make_run(tokenizer, tiny_model_config, tmp_path / "b", **kw)
    first.run(3)
    assert first.buffer.groups or any(s is not None for s in first.buffer.slots)  # work in flight is checkpointed
    first.close()
    resumed = Run.resume(tmp_path / "b" / "r", model=build_model(tiny_model_config, tokenizer, seed=0),
                         tokenizer=tokenizer, log=lambda s: None)
    both = resumed.run(3)
    assert deterministic(both).equals(deterministic(full))
    tensors, meta = resumed.buffer.state()
    with pytest.raises(WorkbenchError, match="no asynchronous pipeline state"):
        resumed.buffer.load_state(tensors, {k: v for k, v in meta.items() if k != "async"})
    with pytest.raises(WorkbenchError, match="pipeline state is damaged"):
        resumed.buffer.load_state(tensors, {**meta, "async": {**meta["async"], "rng": [3, "x", None]}})


def test_partial_rollouts_carry_per_token_versions_and_their_log_probs(tokenizer, tiny_model_config):
    # updates (0.2 s) shorter than a rollout (up to 6 tokens of 0.1 s): rows span several versions
    run = make_run(tokenizer, tiny_model_config, max_new_tokens=6, async_decode_step_s=0.1, async_update_s=0.2)
    weights = {0: copy.deepcopy(run.model.state_dict())}
    batches = []
    run.hooks.append(lambda r, row: (weights.__setitem__(r.version, copy.deepcopy(r.model.state_dict())),
                                     batches.append(r.last_batch)))
    run.run(6)
    batch = concat(batches)
    tv, mask = batch.token_version, batch.response_mask.bool()  # [B, T]
    assert torch.equal(batch.policy_version, tv[:, 0])
    steps = tv[:, 1:] - tv[:, :-1]  # [B, T-1]
    assert bool((steps[mask[:, 1:]] >= 0).all())  # versions never go back along a row
    assert bool((steps[mask[:, 1:]] > 0).any())  # and some rows were continued by a newer version
    model = build_model(tiny_model_config, tokenizer, seed=0).eval()
    checked = 0
    for r in range(len(batch)):
        prompt = batch.prompt_ids[r][batch.prompt_mask[r].bool()].tolist()
        for t in range(int(mask[r].sum())):
            model.load_state_dict(weights[int(tv[r, t])])
            ids = torch.tensor([prompt + batch.response_ids[r, :t].tolist()])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)  # [V] temperature 1
            assert float(logp[batch.response_ids[r, t]]) == pytest.approx(float(batch.behavior_logprobs[r, t]), abs=1e-4)
            checked += 1
    assert checked > 50


def test_whole_rollouts_keep_their_start_version(tokenizer, tiny_model_config):
    run = make_run(tokenizer, tiny_model_config, max_new_tokens=6, async_decode_step_s=0.1, async_update_s=0.2,
                   async_partial=False)
    batches = []
    run.hooks.append(lambda r, row: batches.append(r.last_batch))
    df = run.run(5)
    batch = concat(batches)
    expected = batch.policy_version[:, None].expand_as(batch.token_version)  # [B, T]
    mask = batch.response_mask.bool()
    assert torch.equal(batch.token_version[mask], expected[mask])
    assert df["async/staleness_max"].max() > 0


FAST_GENERATION = dict(async_workers=8, async_decode_step_s=0.05, async_update_s=1.0, max_new_tokens=6)


def test_drop_bounds_staleness_and_drops_when_generation_outpaces_learning(tokenizer, tiny_model_config, tmp_path):
    # 8 slots for a batch of 4 and updates of 1 s against rollouts of <= 0.3 s: the queue would grow stale
    free = make_run(tokenizer, tiny_model_config, **FAST_GENERATION).run(4)
    assert free["async/staleness_max"].max() > 1
    run = make_run(tokenizer, tiny_model_config, tmp_path, async_admission="drop", async_bound=1, **FAST_GENERATION)
    dropped = run.run(4)
    assert dropped["async/staleness_max"].max() <= 1
    assert dropped["async/dropped_seqs"].sum() > 0
    last, counts = dropped.row(-1, named=True), run.buffer.counters
    assert last["async/starved_frac"] == counts.dropped_groups / counts.started_groups > 0
    assert last["async/difficulty_dropped"] == counts.dropped_answer_chars / counts.dropped_groups
    starved = json.loads((tmp_path / "r" / "async_starved.json").read_text())  # the newest dropped prompts
    assert len(starved) == counts.dropped_groups == last["async/dropped_seqs_total"] / 2
    assert all(e["staleness"] > 1 for e in starved)


def test_wait_bounds_staleness_by_holding_starts(tokenizer, tiny_model_config):
    waited = make_run(tokenizer, tiny_model_config, async_admission="wait", async_bound=1, **FAST_GENERATION).run(4)
    assert waited["async/staleness_max"].max() <= 1
    assert waited["async/waited_slot_s"].sum() > 0
    assert waited["async/dropped_seqs"].sum() == 0


def test_pace_starts_at_most_one_batch_per_update(tokenizer, tiny_model_config):
    free = make_run(tokenizer, tiny_model_config, **FAST_GENERATION).run(2)
    assert (free["async/started_groups"] > 2).all()  # what pace holds back
    paced = make_run(tokenizer, tiny_model_config, async_admission="pace", **FAST_GENERATION).run(4)
    assert (paced["async/started_groups"] <= 2).all()  # prompts_per_step = 2 per update
    assert (paced["async/started_groups"] == 2).any()
    assert paced["async/waited_slot_s"].sum() > 0


@pytest.mark.parametrize("bad, message", [
    ({"prefill_batches": 2}, "prefill_batches"), ({"staleness": 1}, "staleness"),
    ({"batch_source": "prioritized"}, "batch_source"), ({"updates_per_batch": 2}, "updates_per_batch"),
    ({"async_admission": "later"}, "async_admission"), ({"async_update_s": 0}, "async_update_s"),
    ({"async_workers": -1}, "async_workers"), ({"staleness_mode": "lagged"}, "staleness_mode"),
    ({"filter_zero_variance": True}, "filter_zero_variance"), ({"max_staleness": 2}, "max_staleness")])
def test_refuses_settings_it_does_not_model(bad, message):
    with pytest.raises(WorkbenchError, match=message):
        RunConfig(**{**SMALL, **bad})


def test_fixed_mode_has_no_token_versions(tokenizer, tiny_model_config):
    run = make_run(tokenizer, tiny_model_config, staleness_mode="fixed")
    row = run.step()
    assert run.last_batch.token_version is None and not any(k.startswith("async/") for k in row)

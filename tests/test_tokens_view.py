"""The per-token view tells the truth about the update it shows (workbench/ui/tokens.py).

Its ratios and gradient weights come from the update's own forward pass, before its optimizer
step (``run.last_update_tokens``, filled by ``steps.update.token_record``): on-policy nothing is
silenced, and off-policy exactly the tokens whose ratio left PPO's clip range in the direction of
the advantage are. References are computed here from a copy of the weights taken before the step.
"""

from __future__ import annotations

import copy
from html.parser import HTMLParser

import torch

from workbench.config import RunConfig
from workbench.loop import Run
from workbench.notebook import TINY_REWARDS
from workbench.policy.logprobs import frozen_logprobs
from workbench.policy.model import build_model
from workbench.steps.update import build_optimizer, update_step
from workbench.ui.tokens import choose_rows, compact, token_html, token_weights, update_view

SMALL = dict(task="addition", task_params={"max_digits": 2, "heldout_size": 16}, prompts_per_step=4,
             group_size=4, eval_every=100, eval_size=16, lr=1e-2, seed=3, rewards=TINY_REWARDS)


def make_run(tokenizer, tiny_model_config, **overrides) -> Run:
    cfg = RunConfig(**{**SMALL, "out_dir": "", "objective": "ppo_clip", **overrides})
    return Run(cfg, model=build_model(tiny_model_config, tokenizer, seed=0), tokenizer=tokenizer, log=lambda s: None)


def whole_batch_view(run: Run) -> dict:
    return update_view(run, n=len(run.last_update_tokens["batch"]))


def test_on_policy_at_staleness_zero_ppo_clip_silences_nothing(tokenizer, tiny_model_config):
    run = make_run(tokenizer, tiny_model_config, staleness=0, objective_params={"clip_low": 0.05, "clip_high": 0.05})
    signal_tokens = after_step_silenced = 0
    for _ in range(6):
        row = run.step()
        v = whole_batch_view(run)
        sig = v["mask"] & (v["advantage"] != 0)  # [n, T]
        signal_tokens += int(sig.sum())
        assert row["offpolicy/clipfrac"] == 0.0
        assert not bool(v["silenced"].any()) and v["silenced_frac"] == 0.0
        assert "line-through" not in token_html(v, tokenizer)
        # the update's own weights: r = 1 and w = r (ppo_clip inside its band) up to fp32 rounding
        assert float((v["ratio"][v["mask"]] - 1).abs().max()) < 1e-6
        assert torch.allclose(v["weight"][sig].double(), torch.ones(int(sig.sum()), dtype=torch.float64), rtol=0, atol=1e-6)
        # the defect this replaces: the weights after the step do leave the band
        after = token_weights(run, run.last_batch, "ppo_clip", run.knobs.applied.objective_params, n=16)
        after_step_silenced += int(after["silenced"].sum())
    assert signal_tokens > 20  # the batches carried advantage signal: the check above was not vacuous
    assert after_step_silenced > 0


def test_stale_tiny_clip_silences_exactly_the_tokens_outside_the_band(tokenizer, tiny_model_config):
    eps = 0.01
    run = make_run(tokenizer, tiny_model_config, staleness=2, objective_params={"clip_low": eps, "clip_high": eps})
    silenced_seen = kept_seen = 0
    for _ in range(8):
        before = copy.deepcopy(run.model)  # the weights the next update uses
        run.step()
        rec, batch = run.last_update_tokens, run.last_batch
        lp = frozen_logprobs(before, batch, run.knobs.applied.temperature).double()  # [B, T]
        assert torch.allclose(rec["logprobs"].double(), lp, rtol=0, atol=1e-6)  # the record is pre-step
        valid = batch.response_mask > 0  # [B, T]
        adv = batch.advantages.double()[:, None].expand_as(lp)  # [B, T]
        r = torch.exp(lp - batch.behavior_logprobs.double())  # [B, T]
        outside = valid & (((adv > 0) & (r > 1 + eps)) | ((adv < 0) & (r < 1 - eps)))  # [B, T]
        signal = valid & (adv != 0)  # [B, T]
        near_edge = ((r - (1 + eps)).abs() < 1e-6) | ((r - (1 - eps)).abs() < 1e-6)  # fp32 ties: not judged
        v = whole_batch_view(run)
        rows = torch.tensor(v["rows"])
        judged = signal[rows] & ~near_edge[rows]  # [n, T]
        assert torch.equal(v["silenced"][judged], outside[rows][judged])
        assert not bool(v["silenced"][~signal[rows]].any())  # A = 0 or padding: never marked
        if not bool(near_edge[signal].any()):
            assert abs(v["silenced_frac"] - int(outside.sum()) / max(1, int(signal.sum()))) < 1e-12
        # dL/dlogp of -min(rA, clip(r)A), token-mean over the batch's N tokens: -A r / N inside, 0 outside
        n_tokens = float(valid.sum())
        grad = torch.where(outside | ~valid, torch.zeros_like(r), -adv * r / n_tokens)  # [B, T]
        inside = signal & ~outside & ~near_edge
        assert torch.allclose(rec["logprob_grad"].double()[inside], grad[inside], rtol=1e-6, atol=0)
        assert bool((rec["logprob_grad"][outside & ~near_edge] == 0).all())
        w_inside = v["weight"].double()[signal[rows] & ~outside[rows] & ~near_edge[rows]]
        assert torch.allclose(w_inside, r[rows][signal[rows] & ~outside[rows] & ~near_edge[rows]], rtol=1e-6, atol=0)
        silenced_seen += int(outside.sum())
        kept_seen += int((signal & ~outside).sum())
    assert silenced_seen >= 5 and kept_seen >= 5  # both kinds of token were judged


def test_keeping_the_record_leaves_the_update_unchanged(tokenizer, tiny_model_config):
    run = make_run(tokenizer, tiny_model_config, staleness=0)
    run.step()
    batch = run.last_batch
    outs = []
    for keep in (None, {}):
        model = copy.deepcopy(run.model)
        opt = build_optimizer(model, 1e-2, 0.0, (0.9, 0.999))
        metrics = update_step(model, opt, batch, objective="ppo_clip", temperature=1.0, grad_clip=1.0, keep_tokens=keep)
        outs.append(([p.detach().clone() for p in model.parameters()], metrics, keep))
    (p0, m0, _), (p1, m1, rec) = outs
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert {k: v for k, v in m0.items() if not k.startswith("perf/")} == {k: v for k, v in m1.items() if not k.startswith("perf/")}
    assert rec["batch"] is batch and rec["objective"] == "ppo_clip" and rec["logprob_grad"].shape == batch.response_mask.shape


def test_rows_show_contrast_silenced_first_and_no_duplicates():
    # group 0: four identical completions with A = 0; group 1: positive only; group 2: both signs,
    # rows 8 and 9 the same completion, row 10 with silenced tokens
    group_id = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    seq_adv = torch.tensor([0.0, 0, 0, 0, 1.0, 1.0, 0.5, 0.5, 1.0, 1.0, -1.0, 0.5])
    silenced = torch.tensor([0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 2, 0])
    keys = [(0, (1, 2))] * 4 + [(1, (i,)) for i in range(4)] + [(2, (5,)), (2, (5,)), (2, (6,)), (2, (7,))]
    rows = choose_rows(group_id, seq_adv, silenced, keys, 4)
    assert rows == [10, 8, 11, 4]  # the mixed group first (silenced row, then by index), 9 duplicates 8
    assert choose_rows(group_id, seq_adv, silenced, keys, 2) == [10, 8]  # one row of each sign
    assert choose_rows(group_id, seq_adv, silenced, keys, 12) == [10, 8, 11, 4, 5, 6, 7, 0]  # one row of group 0
    assert choose_rows(group_id[:4], seq_adv[:4], silenced[:4], keys[:4], 6) == [0]


def test_live_rows_have_both_signs_and_distinct_completions(tokenizer, tiny_model_config):
    run = make_run(tokenizer, tiny_model_config, staleness=2, objective_params={"clip_low": 0.01, "clip_high": 0.01})
    mixed_batches = 0
    for _ in range(8):
        run.step()
        v = update_view(run, n=6)
        batch = run.last_batch
        keys = [(batch.prompts[i], batch.completions[i]) for i in v["rows"]]
        assert len(set(keys)) == len(keys) and len(keys) <= 6
        adv = batch.advantages
        groups_mixed = [g for g in torch.unique(batch.group_id).tolist()
                        if bool((adv[batch.group_id == g] > 0).any()) and bool((adv[batch.group_id == g] < 0).any())]
        if groups_mixed:
            mixed_batches += 1
            shown = adv[torch.tensor(v["rows"])]
            assert bool((shown > 0).any()) and bool((shown < 0).any())
            assert int(batch.group_id[v["rows"][0]]) in groups_mixed
        counts = v["silenced"].sum(1).tolist()  # rows with silenced tokens come first (within the chosen group)
        first_group = [c for i, c in zip(v["rows"], counts) if int(batch.group_id[i]) == int(batch.group_id[v["rows"][0]])]
        assert first_group == sorted(first_group, reverse=True)
    assert mixed_batches > 0


class _Cells(HTMLParser):
    """The visible text of each token cell's r and w (titles ignored) and the struck tokens."""

    def __init__(self):
        super().__init__()
        self.values: list[tuple[str, str]] = []
        self.struck = 0
        self._class: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._class.append(a.get("class"))
        self.struck += "line-through" in (a.get("style") or "")

    def handle_endtag(self, tag):
        self._class.pop()

    def handle_data(self, data):
        if self._class and self._class[-1] in ("wb-r", "wb-w"):
            self.values.append((self._class[-1], data))


def test_html_shows_r_and_w_under_every_token(tokenizer, tiny_model_config):
    run = make_run(tokenizer, tiny_model_config, staleness=2, objective_params={"clip_low": 0.01, "clip_high": 0.01})
    for _ in range(6):
        run.step()
        v = update_view(run, n=6)
        if bool(v["silenced"].any()):
            break
    assert bool(v["silenced"].any())
    parser = _Cells()
    parser.feed(token_html(v, tokenizer, "t"))
    expected = []
    for i in range(v["ratio"].shape[0]):
        for t in torch.nonzero(v["mask"][i]).flatten().tolist():
            a = float(v["advantage"][i, t])
            expected += [("wb-r", compact(float(v["ratio"][i, t]))),
                         ("wb-w", compact(float(v["weight"][i, t])) if a != 0 else "\u2013")]
    assert parser.values == expected
    assert parser.struck == int(v["silenced"].sum())
    assert [compact(x) for x in (1.0, 0.0, -0.256, 123.4, float("inf"))] == ["1.00", "0.00", "-0.26", "1e+02", "inf"]

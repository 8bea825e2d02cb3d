"""The per-token entropy study (workbench.studies.token_entropy) and its CLI module (workbench.cli.entropy)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import polars as pl
import pytest
import torch

from workbench.cli import OneLineParser
from workbench.cli import entropy as entropy_cli
from workbench.errors import WorkbenchError
from workbench.rollouts import Rollouts
from workbench.studies import token_entropy as te
from workbench.tasks import make_task


class FixedLogits(torch.nn.Module):
    """A stand-in model whose next-token logits are ``table[position]`` whatever the input."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)  # [L, V]

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        B, L = input_ids.shape
        logits = self.table[:L].expand(B, L, -1)  # [B, L, V]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def _rollouts(B: int, P: int, T: int, lengths: list[int]) -> Rollouts:
    mask = torch.zeros(B, T)  # [B, T]
    for i, n in enumerate(lengths):
        mask[i, :n] = 1.0
    return Rollouts(prompt_ids=torch.ones(B, P, dtype=torch.long), prompt_mask=torch.ones(B, P, dtype=torch.long),
                    response_ids=torch.zeros(B, T, dtype=torch.long), response_mask=mask,
                    behavior_logprobs=torch.zeros(B, T), policy_version=torch.zeros(B, dtype=torch.long),
                    group_id=torch.arange(B))


def test_entropies_match_a_hand_computation():
    P, T = 2, 3
    # logits at position P-1+t predict response token t: t=0 uniform over 4 -> ln 4; t=1 (1/2, 1/4, 1/4, 0)
    # -> 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2; t=2 certain -> 0
    table = torch.zeros(P + T + 1, 4)
    table[P] = torch.log(torch.tensor([0.5, 0.25, 0.25, 1e-30]))
    table[P + 1] = torch.tensor([0.0, -200.0, -200.0, -200.0])
    ent, pos = te.per_token(FixedLogits(table), _rollouts(2, P, T, [3, 2]))
    expected = [math.log(4), 1.5 * math.log(2), 0.0, math.log(4), 1.5 * math.log(2)]  # padding skipped
    assert ent.tolist() == pytest.approx(expected, abs=1e-6)
    assert pos.tolist() == [0, 1, 2, 0, 1]


def test_sampled_entropies_on_the_tiny_model(tiny_model, tokenizer):
    task = make_task("scratchpad", heldout_size=8)
    h = te.sample_entropies(tiny_model, tokenizer, task, prompts=3, group_size=2, seed=1)
    again = te.sample_entropies(tiny_model, tokenizer, task, prompts=3, group_size=2, seed=1)
    assert torch.equal(h, again)  # deterministic for a seed
    assert 6 <= h.numel() <= 6 * task.max_answer_tokens
    assert float(h.min()) >= 0 and float(h.max()) <= math.log(len(tokenizer)) + 1e-6
    # first response token of the first prompt, computed directly: softmax of the last prompt position
    ids = torch.tensor([tokenizer(task.heldout[0].prompt)["input_ids"]])
    with torch.no_grad():
        p = torch.softmax(tiny_model(input_ids=ids).logits[0, -1].double(), -1)
    assert float(h[0]) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-5)


def test_summary_shares_and_quantiles():
    h = torch.tensor([0.0, 0.005, 0.05, 0.2, 0.7, 1.0, 2.0, 3.0])
    s = te.summarize(h)
    assert (s["share < 0.01"], s["share < 0.1"], s["share < 0.5"]) == (2 / 8, 3 / 8, 4 / 8)
    # linear interpolation between order statistics: q50 at index 3.5, q80 at 5.6
    assert s["q50"] == pytest.approx(0.45) and s["q80"] == pytest.approx(1.6)
    assert s["q99"] == pytest.approx(2.0 + 0.93 * 1.0)
    table = te.entropy_table({"a": h, "b": torch.zeros(5)})
    assert table["statistic"].to_list() == ["share < 0.01", "share < 0.1", "share < 0.5", "q50", "q80", "q95",
                                            "q99", "tokens"]
    assert table["a"].to_list()[-1] == 8 and table["b"].to_list()[:3] == [1.0, 1.0, 1.0]
    ref = dict(zip(table["statistic"], table[te.REFERENCE]))
    assert ref["q80"] == "0.672" and ref["share < 0.01"] == "> 0.50" and ref["q95"] == "n/a"
    text = te.format_table(table)
    assert "| share < 0.01 | 0.2500 | 1.0000 | > 0.50 |" in text and "arXiv:2506.01939" in text
    with pytest.raises(WorkbenchError, match="non-empty tensor"):
        te.summarize(torch.tensor([]))
    with pytest.raises(WorkbenchError, match="finite entropies"):
        te.summarize(torch.tensor([0.1, float("nan")]))


def test_histogram_shares_sum_to_one_and_mark_the_reference():
    samples = {"a": torch.tensor([0.0, 1e-9, 0.005, 0.05, 0.7, 3.0]), "b": torch.full((4,), 0.3)}
    frame = te.histogram_frame(samples)
    for name, part in frame.group_by("sample"):
        assert sum(part["share"]) == pytest.approx(1.0)
    a = frame.filter(pl.col("sample") == "a")
    assert a["share"][0] == pytest.approx(2 / 6)  # 0 and 1e-9 fall below FLOOR: the first bin
    hit = frame.filter((pl.col("sample") == "b") & (pl.col("lo") <= 0.3) & (pl.col("hi") > 0.3))
    assert hit["share"].to_list() == [1.0]
    spec = te.histogram_spec(samples)
    refs = [d for d in spec["data"]["values"] if "label" in d]
    assert sorted({d["x"] for d in refs}) == [0.01, 0.672]
    assert spec["spec"]["layer"][0]["encoding"]["x"]["scale"]["type"] == "log"


def _parse(argv: list[str]):
    parser = OneLineParser(prog="python -m workbench", allow_abbrev=False)
    entropy_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["entropy", *argv])


@pytest.mark.parametrize("argv,needle", [
    (["--task", "nope"], "nope"),
    (["--task", "scratchpad", "--prompts", "0"], "--prompts=0 is invalid"),
    (["--task", "scratchpad", "--group-size", "-1"], "--group-size=-1 is invalid"),
    (["--task", "scratchpad", "--task-params", "max_digits"], "expected key=value"),
    (["--task", "scratchpad", "--task-params", "max_digits=0"], "scratchpad.max_digits=0 is invalid"),
    (["--task", "scratchpad", "--model", "/no/such/folder"], "--model '/no/such/folder' is invalid"),
    (["--task", "scratchpad", "--threads", "-2"], "--threads=-2 is invalid"),
])
def test_cli_bad_input_is_one_line(argv, needle, tmp_path):
    with pytest.raises(WorkbenchError) as e:
        entropy_cli.cli_main(_parse([*argv, "--out", str(tmp_path / "out")]))
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()  # bad input writes nothing


def test_cli_bad_flag_is_one_line():
    with pytest.raises(WorkbenchError) as e:
        _parse(["--task", "scratchpad", "--promts", "3"])
    assert "unrecognized arguments" in str(e.value) and "\n" not in str(e.value)


def test_cli_tiny_model_writes_table_and_figure(tmp_path, capsys):
    code = entropy_cli.cli_main(_parse(["--task", "scratchpad", "--task-params", "heldout_size=4", "--task",
                                        "addition", "--model", "tiny", "--prompts", "2", "--group-size", "2",
                                        "--out", str(tmp_path)]))
    assert code == 0
    out = capsys.readouterr().out
    assert "| statistic | scratchpad | addition | Wang et al. 2025 (Qwen3-8B CoT) |" in out
    table = pl.read_parquet(tmp_path / entropy_cli.TABLE_FILE)
    assert table.columns == ["statistic", "scratchpad", "addition", te.REFERENCE]
    assert (tmp_path / entropy_cli.FIGURE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""Tasks: prompt sources with a verifiable answer, a held-out set and an expert answer.

Built-in synthetic tasks (``addition``, ``reverse``) and tasks read from data: a JSONL file
(``jsonl``), a parquet file (``parquet``), a folder written by ``datasets``' ``save_to_disk``
(``hf_dataset``), all mapped to examples by one ``FieldMapping`` (``workbench.tasks.files``). A task
holds no random state: every draw uses the ``random.Random`` passed to ``sample`` (the loop owns it
and saves it in checkpoints), and the held-out set comes from a fixed seed, so a task is fully
described by its name and params (``Task.spec``).

Held-out prompts never appear in training: synthetic tasks redraw any sampled prompt that is in the
held-out set; data tasks split *unique prompts* (not rows) into held-out and train, or hold out a
split and drop its prompts from training.

Chat templates are applied to a task's prompts by ``workbench.policy.chat``. Left out: multi-turn
prompts, partial credit (``verify`` is exact match after stripping whitespace, or mathematical
equivalence for a data task with ``verify="math_equiv"``; graded rewards belong to reward
functions, which get ``Example.extra``).
"""

from __future__ import annotations

import hashlib
import json
import random
from functools import cached_property
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError, bad_value
from workbench.tasks.math_answers import equivalent
from workbench.tasks.saved_datasets import SavedDataset
from workbench.tasks.files import (MAPPING_DEFAULTS, MAX_JSONL_LINE_BYTES, FieldMapping, Record, check_path,
                                  frame_records, jsonl_records, read_parquet)
from workbench.tasks.base import HELDOUT_SEED, TASKS, Example, Task, _check_int  # noqa: F401 (re-exported)
from workbench.tasks.synthetic import Addition, Reverse


# ------------------------------------------------------------------------------ tasks from data
VERIFY_MODES = ("exact", "math_equiv")
DATA_DEFAULTS: dict[str, Any] = {"path": None, **MAPPING_DEFAULTS, "heldout_fraction": 0.1,
                                 "max_answer_tokens": None, "verify": "exact"}


class DataTask(Task):
    """Base of the tasks read from data (docs/design.md, "Tasks from data"): every source kind maps
    rows to examples with one ``FieldMapping`` (``workbench.tasks.files``) and only says how to read
    its files (``_load``). ``verify`` (held-out accuracy and the warm start) is ``"exact"`` (stripped
    strings) or ``"math_equiv"`` (``workbench.tasks.math_answers.equivalent``). The fingerprint hashes the
    files read, so cached warm starts follow the data."""

    source = "a data file"

    def _validate(self) -> None:
        p = self.params
        path = check_path(self.name, p["path"], self.source)
        p["path"] = str(path)
        mapping = FieldMapping.from_params(self.name, p)
        f = p["heldout_fraction"]
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1):
            raise bad_value(f"{self.name}.heldout_fraction", f, "a number in [0, 1)")
        if p["max_answer_tokens"] is not None:
            _check_int(self.name, "max_answer_tokens", p["max_answer_tokens"], 1)
        if p["verify"] not in VERIFY_MODES:
            raise bad_value(f"{self.name}.verify", p["verify"], " | ".join(VERIFY_MODES))
        held, train, files = self._load(path, mapping)
        self._heldout, self._train = [Example(*r) for r in held], [Example(*r) for r in train]
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
        self._digest = digest.hexdigest()

    def _load(self, path: Path, mapping: FieldMapping) -> tuple[list[Record], list[Record], list[Path]]:
        """(held-out records, training records, the files read) of the task's source."""
        raise NotImplementedError

    def _split(self, records: list[Record], where: str) -> tuple[list[Record], list[Record]]:
        """Hold out ``heldout_fraction`` of the unique prompts (a fixed-seed shuffle; at least one
        when the fraction is > 0) with every record of theirs."""
        f = self.params["heldout_fraction"]
        f = 0.1 if f is None else f
        prompts = list(dict.fromkeys(r[0] for r in records))
        random.Random(HELDOUT_SEED).shuffle(prompts)
        k = 0 if f == 0 else max(1, round(f * len(prompts)))
        if k >= len(prompts):
            raise WorkbenchError(
                f"{self.name}.heldout_fraction={f!r} is invalid: {where} has {len(prompts)} unique "
                f"prompt(s), so nothing would be left to train on; add rows or lower the fraction"
            )
        held = set(prompts[:k])
        return [r for r in records if r[0] in held], [r for r in records if r[0] not in held]

    @property
    def fingerprint(self) -> str:
        return json.dumps({**self.spec(), "sha256": self._digest}, sort_keys=True)

    @cached_property
    def heldout(self) -> list[Example]:
        return list(self._heldout)

    @property
    def train(self) -> list[Example]:
        """The training examples (every row whose prompt is not held out), in file order."""
        return list(self._train)

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        _check_int(self.name, "n", n, 0)
        return [self._train[rng.randrange(len(self._train))] for _ in range(n)]

    def verify(self, completion: str, example: Example) -> bool:
        if self.params["verify"] == "math_equiv":
            return equivalent(completion, example.answer)
        return super().verify(completion, example)

    @property
    def alphabet(self) -> str:
        return "".join(sorted({c for ex in self._heldout + self._train for c in ex.prompt + ex.answer}))

    @property
    def max_answer_tokens(self) -> int:
        if self.params["max_answer_tokens"] is not None:
            return self.params["max_answer_tokens"]
        # One token per character bounds character-level and typical BPE tokenizers.
        return max(len(ex.answer) for ex in self._heldout + self._train) + 1


@TASKS.register("jsonl", summary="prompts and answers from a JSONL file (path=...; prompt/answer/extra mapping)")
class JsonlTask(DataTask):
    """Each non-blank line of ``path`` is a JSON object (UTF-8, at most ``MAX_JSONL_LINE_BYTES``);
    by default its string ``prompt`` and ``answer`` make the example and every other field goes in
    ``Example.extra``. ``heldout_fraction`` of the unique prompts are held out (``DataTask._split``)."""

    name = "jsonl"
    source = "a JSONL file"
    defaults = dict(DATA_DEFAULTS)

    def _load(self, path: Path, mapping: FieldMapping) -> tuple[list[Record], list[Record], list[Path]]:
        return (*self._split(jsonl_records(path, mapping), str(path)), [path])


@TASKS.register("parquet", summary="prompts and answers from a parquet file (path=...; prompt/answer/extra mapping)")
class ParquetTask(DataTask):
    """A parquet file read with polars; columns mapped by ``prompt``, ``answer``, ``extra``
    (``workbench.tasks.files``); ``heldout_fraction`` of the unique prompts are held out."""

    name = "parquet"
    source = "a parquet file"
    defaults = dict(DATA_DEFAULTS)

    def _load(self, path: Path, mapping: FieldMapping) -> tuple[list[Record], list[Record], list[Path]]:
        records = frame_records(read_parquet(path, self.name), mapping, str(path))
        return (*self._split(records, str(path)), [path])


@TASKS.register("hf_dataset", summary="a folder written by datasets' save_to_disk (path=...; split, "
                "heldout_split or heldout_fraction)")
class HfDatasetTask(DataTask):
    """A ``Dataset`` or ``DatasetDict`` folder written by ``save_to_disk``, read with pyarrow
    (``workbench.tasks.saved_datasets``: ``datasets`` itself is not needed). For a DatasetDict, ``split``
    (default ``"train"``) is trained on and ``heldout_split`` (e.g. ``"test"``) is held out;
    training rows whose prompt is also in the held-out split are dropped, so held-out prompts are
    never trained on. Without ``heldout_split`` (and always for a single Dataset),
    ``heldout_fraction`` (default 0.1) of the training split's unique prompts are held out."""

    name = "hf_dataset"
    source = "a folder written by datasets' save_to_disk"
    defaults = {**DATA_DEFAULTS, "heldout_fraction": None, "split": None, "heldout_split": None}

    def _load(self, path: Path, mapping: FieldMapping) -> tuple[list[Record], list[Record], list[Path]]:
        p, saved = self.params, SavedDataset.open(path, self.name)
        if saved.is_dict:
            split = saved.check_split(self.name, "split", "train" if p["split"] is None else p["split"])
        else:
            split = "" if p["split"] is None else saved.check_split(self.name, "split", p["split"])
        records = frame_records(saved.frame(split), mapping, str(saved.splits[split]))
        files = saved.shard_files(split)
        if p["heldout_split"] is None:
            return (*self._split(records, str(saved.splits[split])), files)
        held_split = saved.check_split(self.name, "heldout_split", p["heldout_split"])
        if p["heldout_fraction"] is not None:
            raise bad_value(f"{self.name}.heldout_fraction", p["heldout_fraction"],
                            f"None with heldout_split={held_split!r} (hold out by a split or by a fraction)")
        if held_split == split:
            raise bad_value(f"{self.name}.heldout_split", held_split, f"a split other than split={split!r}")
        held = frame_records(saved.frame(held_split), mapping, str(saved.splits[held_split]))
        prompts = {r[0] for r in held}
        train = [r for r in records if r[0] not in prompts]
        if not train:
            raise WorkbenchError(f"{self.name}.heldout_split={held_split!r} is invalid: every prompt of split "
                                 f"{split!r} is also in it, so nothing would be left to train on")
        return held, train, files + saved.shard_files(held_split)


def make_task(name: str, **params: Any) -> Task:
    """Build a registered task: ``make_task("addition", max_digits=2)``."""
    return TASKS.get(name)(**params)


__all__ = ["Example", "TASKS", "Task", "Addition", "Reverse", "DataTask", "JsonlTask", "ParquetTask", "HfDatasetTask",
           "make_task", "HELDOUT_SEED", "MAX_JSONL_LINE_BYTES", "VERIFY_MODES"]

from workbench.tasks import scratchpad as _scratchpad  # noqa: E402,F401 - registers "scratchpad" after the data tasks (listing order)

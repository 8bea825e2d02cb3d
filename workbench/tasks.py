"""Tasks: prompt sources with a verifiable answer, a held-out set and an expert answer.

Built-in synthetic tasks (``addition``, ``reverse``) and a user task read from a JSONL file
(``jsonl``). A task holds no random state: every draw uses the ``random.Random`` passed to
``sample`` (the loop owns it and saves it in checkpoints), and the held-out set comes from a fixed
seed, so a task is fully described by its name and params (``Task.spec``).

Held-out prompts never appear in training: synthetic tasks redraw any sampled prompt that is in the
held-out set; the JSONL task splits *unique prompts* (not lines) into held-out and train.

Chat templates are applied to a task's prompts by ``workbench.policy.chat``. Left out: multi-turn
prompts, partial credit (``verify`` is exact match after
stripping whitespace; graded rewards belong to reward functions, which get ``Example.extra``).
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from workbench.errors import WorkbenchError, bad_value, parse_json, short_repr
from workbench.registry import Registry

HELDOUT_SEED = 1_234_567  # fixed: the held-out set never depends on the run's seed
MAX_JSONL_LINE_BYTES = 1 << 20
"""Longest line (1 MiB) a JSONL task may have: a longer one is refused before it is decoded or
tokenised (a 50 MB prompt would otherwise be read, rendered and tokenised before any length check)."""


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer; ``extra`` is passed to reward functions."""

    prompt: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)


TASKS: Registry[type["Task"]] = Registry("task")


def _check_int(task: str, name: str, value: Any, lo: int, hi: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad_value(f"{task}.{name}", value, f"an int {rng}")
    return value


class Task:
    """Base class. Subclasses set ``name``, ``defaults`` and implement ``_draw`` (synthetic) or
    override ``sample`` and ``heldout``."""

    name: ClassVar[str] = "task"
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise WorkbenchError(
                f"unknown param {unknown[0]!r} for task {self.name!r}: valid params are "
                f"{', '.join(sorted(self.defaults))}"
            )
        self.params: dict[str, Any] = {**self.defaults, **params}
        self._validate()
        if "heldout_size" in self.params:
            size, space = self.params["heldout_size"], self._space_size()
            if size > space // 2:
                raise WorkbenchError(
                    f"{self.name}.heldout_size={size} is invalid: expected at most half of the "
                    f"{space} distinct prompts ({space // 2}); lower it or widen the task"
                )

    # ---- to override ----
    def _validate(self) -> None:
        pass

    def _draw(self, rng: random.Random) -> Example:
        raise NotImplementedError

    @property
    def alphabet(self) -> str:
        """Every character a prompt or answer of this task can contain."""
        raise NotImplementedError

    @property
    def max_answer_tokens(self) -> int:
        """Generation budget: the longest answer in characters plus one token for EOS."""
        raise NotImplementedError

    def _space_size(self) -> int:
        """Number of distinct prompts (used to refuse a held-out set that would eat the space)."""
        raise NotImplementedError

    # ---- shared behaviour ----
    def spec(self) -> dict[str, Any]:
        """JSON-able description: enough to rebuild the task with ``make_task``."""
        return {"name": self.name, "params": dict(self.params)}

    @property
    def fingerprint(self) -> str:
        """A stable string identifying the task's content (cache keys use it)."""
        return json.dumps(self.spec(), sort_keys=True)

    @cached_property
    def heldout(self) -> list[Example]:
        """A fixed set of ``heldout_size`` distinct examples drawn with a fixed seed."""
        size = self.params["heldout_size"]
        rng = random.Random(HELDOUT_SEED)
        seen: dict[str, Example] = {}
        while len(seen) < size:
            ex = self._draw(rng)
            seen.setdefault(ex.prompt, ex)
        return list(seen.values())

    @cached_property
    def _heldout_prompts(self) -> frozenset[str]:
        return frozenset(ex.prompt for ex in self.heldout)

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        """``n`` training examples drawn i.i.d. with ``rng`` (never a held-out prompt)."""
        _check_int(self.name, "n", n, 0)
        held = self._heldout_prompts
        out = []
        while len(out) < n:
            ex = self._draw(rng)
            if ex.prompt not in held:
                out.append(ex)
        return out

    def verify(self, completion: str, example: Example) -> bool:
        """Exact match after stripping surrounding whitespace."""
        return completion.strip() == example.answer.strip()

    def expert(self, example: Example) -> str:
        """A correct answer (SFT and demonstration-mixing objectives use it)."""
        return example.answer

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"


@TASKS.register("addition", summary="a+b= -> sum; operands of min_digits..max_digits digits")
class Addition(Task):
    """``"37+48="`` -> ``"85"`` (``max_digits=3``: ``"37+485="`` -> ``"522"``). Each operand's digit
    count is uniform in [min_digits, max_digits], then the operand is uniform among numbers with
    that many digits (1 digit includes 0; no zero padding). The default ``max_digits=2`` is the
    size the built-in model learns by RL within minutes on a CPU (README, "Choosing the default")."""

    name = "addition"
    defaults = {"min_digits": 1, "max_digits": 2, "heldout_size": 256}

    def _validate(self) -> None:
        p = self.params
        _check_int(self.name, "min_digits", p["min_digits"], 1, 18)
        _check_int(self.name, "max_digits", p["max_digits"], p["min_digits"], 18)
        _check_int(self.name, "heldout_size", p["heldout_size"], 0)

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(self.params["min_digits"], self.params["max_digits"])
        lo = 0 if d == 1 else 10 ** (d - 1)
        return rng.randint(lo, 10**d - 1)

    def _draw(self, rng: random.Random) -> Example:
        a, b = self._operand(rng), self._operand(rng)
        return Example(f"{a}+{b}=", str(a + b))

    @property
    def alphabet(self) -> str:
        return string.digits + "+="

    @property
    def max_answer_tokens(self) -> int:
        return self.params["max_digits"] + 1 + 1  # carry digit + EOS

    def _space_size(self) -> int:
        lo, hi = self.params["min_digits"], self.params["max_digits"]
        count = sum(10 if d == 1 else 9 * 10 ** (d - 1) for d in range(lo, hi + 1))
        return count * count


@TASKS.register("reverse", summary="rev:abc= -> cba; strings of min_len..max_len letters")
class Reverse(Task):
    """``"rev:abcde="`` -> ``"edcba"``: a longer answer than addition. Length uniform in
    [min_len, max_len], letters uniform over the first ``alphabet_size`` lowercase letters."""

    name = "reverse"
    defaults = {"min_len": 3, "max_len": 8, "alphabet_size": 8, "heldout_size": 256}

    def _validate(self) -> None:
        p = self.params
        _check_int(self.name, "min_len", p["min_len"], 1, 40)
        _check_int(self.name, "max_len", p["max_len"], p["min_len"], 40)
        _check_int(self.name, "alphabet_size", p["alphabet_size"], 2, 26)
        _check_int(self.name, "heldout_size", p["heldout_size"], 0)

    @property
    def letters(self) -> str:
        return string.ascii_lowercase[: self.params["alphabet_size"]]

    def _draw(self, rng: random.Random) -> Example:
        n = rng.randint(self.params["min_len"], self.params["max_len"])
        s = "".join(rng.choice(self.letters) for _ in range(n))
        return Example(f"rev:{s}=", s[::-1])

    @property
    def alphabet(self) -> str:
        return "rev:=" + "".join(c for c in self.letters if c not in "rev")

    @property
    def max_answer_tokens(self) -> int:
        return self.params["max_len"] + 1  # + EOS

    def _space_size(self) -> int:
        k = self.params["alphabet_size"]
        return sum(k**n for n in range(self.params["min_len"], self.params["max_len"] + 1))


@TASKS.register("jsonl", summary="prompts and answers from a JSONL file (path=...)")
class JsonlTask(Task):
    """A user task: each non-blank line of ``path`` is an object with string ``prompt`` and
    ``answer`` plus optional extra fields (kept in ``Example.extra``); the file is UTF-8 and no line
    is longer than ``MAX_JSONL_LINE_BYTES``. A fixed-seed shuffle of the
    unique prompts puts ``heldout_fraction`` of them in the held-out set (at least one when the
    fraction is > 0); all lines with those prompts are held out."""

    name = "jsonl"
    defaults = {"path": None, "heldout_fraction": 0.1, "max_answer_tokens": None}

    def _validate(self) -> None:
        p = self.params
        if not isinstance(p["path"], (str, Path)) or not str(p["path"]):
            raise bad_value("jsonl.path", p["path"], "the path of a JSONL file")
        p["path"] = str(p["path"])
        f = p["heldout_fraction"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise bad_value("jsonl.heldout_fraction", f, "a number in [0, 1)")
        m = p["max_answer_tokens"]
        if m is not None:
            _check_int(self.name, "max_answer_tokens", m, 1)
        self._examples = self._read(Path(p["path"]))
        prompts = list(dict.fromkeys(ex.prompt for ex in self._examples))
        random.Random(HELDOUT_SEED).shuffle(prompts)
        k = 0 if f == 0 else max(1, round(f * len(prompts)))
        if k >= len(prompts):
            raise WorkbenchError(
                f"jsonl.heldout_fraction={f!r} is invalid: {p['path']} has {len(prompts)} unique "
                f"prompt(s), so nothing would be left to train on; add lines or lower the fraction"
            )
        held = set(prompts[:k])
        self._heldout = [ex for ex in self._examples if ex.prompt in held]
        self._train = [ex for ex in self._examples if ex.prompt not in held]
        self._digest = hashlib.sha256(Path(p["path"]).read_bytes()).hexdigest()

    @staticmethod
    def _read(path: Path) -> list[Example]:
        if not path.is_file():
            raise WorkbenchError(f"jsonl.path={str(path)!r} is invalid: no such file")
        out = []
        try:
            fh = path.open("rb")
        except OSError as e:
            raise WorkbenchError(f"jsonl.path={str(path)!r} is invalid: cannot read it ({e.strerror})") from None
        with fh:
            for lineno, line in enumerate(_lines(fh, path), start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                obj = parse_json(line, where, "bad JSON")
                if not isinstance(obj, dict):
                    raise WorkbenchError(f"{where}: expected a JSON object, got {type(obj).__name__}")
                for key in ("prompt", "answer"):
                    if key not in obj:
                        raise WorkbenchError(f"{where}: missing {key!r} (keys: {', '.join(obj) or 'none'})")
                    if not isinstance(obj[key], str):
                        raise WorkbenchError(
                            f"{where}: {key!r} must be a string, got {type(obj[key]).__name__} {short_repr(obj[key])}"
                        )
                extra = {k: v for k, v in obj.items() if k not in ("prompt", "answer")}
                out.append(Example(obj["prompt"], obj["answer"], extra))
        if not out:
            raise WorkbenchError(f"jsonl.path={str(path)!r} is invalid: the file has no examples")
        return out

    @property
    def fingerprint(self) -> str:
        return json.dumps({**self.spec(), "sha256": self._digest}, sort_keys=True)

    @cached_property
    def heldout(self) -> list[Example]:
        return list(self._heldout)

    @property
    def train(self) -> list[Example]:
        """The training examples (every line whose prompt is not held out), in file order."""
        return list(self._train)

    def sample(self, rng: random.Random, n: int) -> list[Example]:
        _check_int(self.name, "n", n, 0)
        return [self._train[rng.randrange(len(self._train))] for _ in range(n)]

    @property
    def alphabet(self) -> str:
        return "".join(sorted({c for ex in self._examples for c in ex.prompt + ex.answer}))

    @property
    def max_answer_tokens(self) -> int:
        if self.params["max_answer_tokens"] is not None:
            return self.params["max_answer_tokens"]
        # One token per character bounds character-level and typical BPE tokenizers.
        return max(len(ex.answer) for ex in self._examples) + 1


def _lines(fh, path: Path):
    """The decoded lines of a binary file, each refused (with its number) when it is longer than
    ``MAX_JSONL_LINE_BYTES`` or not UTF-8; at most that many bytes of a line are ever read at once."""
    lineno = 0
    while True:
        raw = fh.readline(MAX_JSONL_LINE_BYTES + 2)  # + "\r\n"
        if not raw:
            return
        lineno += 1
        if len(raw.rstrip(b"\n").rstrip(b"\r")) > MAX_JSONL_LINE_BYTES:
            raise WorkbenchError(f"{path}:{lineno}: line longer than {MAX_JSONL_LINE_BYTES} bytes "
                                 f"(MAX_JSONL_LINE_BYTES); shorten the prompt or answer")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise WorkbenchError(f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                                 "of the line)") from None


def make_task(name: str, **params: Any) -> Task:
    """Build a registered task: ``make_task("addition", max_digits=2)``."""
    return TASKS.get(name)(**params)


__all__ = ["Example", "TASKS", "Task", "Addition", "Reverse", "JsonlTask", "make_task", "HELDOUT_SEED",
           "MAX_JSONL_LINE_BYTES"]

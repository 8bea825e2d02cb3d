"""The built-in synthetic tasks ``addition`` and ``reverse`` (their docstrings say what they draw).
"""

from __future__ import annotations

import random
import string

from workbench.tasks.base import TASKS, Example, Task, _check_int


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

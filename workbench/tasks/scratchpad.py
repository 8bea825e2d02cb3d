"""``scratchpad``: multi-digit addition with a written-out, column-by-column scratchpad.

    "47+85="  ->  "7+5+0=12,4+8+1=13,>132"

Why this task exists: in ``addition`` every answer token is a decision (three tokens, each a sum
digit), so an update moves every token's probability and importance ratios drift far more per update
than in LLM reasoning. There most tokens are nearly determined by the context and a minority of
high-entropy "forking" tokens carries the decisions (Wang et al. 2025, "Beyond the 80/20 Rule:
High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM Reasoning",
arXiv:2506.01939). Here the copied operand digits, the carry-in, the separators and the final answer
(a copy of the sum digits written above it) are determined by the prompt and what was already
written; the column sums ``ts`` are the decisions.

**Format.** One fixed-width column per digit position, least significant first:
``a+b+c=ts,`` with ``a``, ``b`` the operands' digits at that position (``0`` past the end of the
shorter operand), ``c`` the carry into the column (``0`` in the first column) and ``ts`` the column
sum as two digits (``t`` is the carry out). After the last column: ``>`` and the sum in decimal (no
leading zeros). Every character is in ``DEFAULT_ALPHABET``.

**Grading.** ``verify`` compares only the text after the last ``>`` with the sum (stripped, exact
string); the scratchpad is not graded, as reasoning chains are not in LLM RL with verifiable
rewards. ``Example.answer`` and ``expert`` are the full correct scratchpad (what SFT and
demonstration-mixing objectives imitate). The ``final_answer`` reward grades what ``verify`` grades
(``rewards=(("final_answer", 1.0),)``); the default ``exact_match`` grades the whole scratchpad, a
stricter reward than ``verify``.

**Lengths.** With ``d = max_digits`` the answer is ``10 d + 2`` characters (+ EOS) and the prompt
at most ``2 d + 2``: ``12 d + 5`` positions, 41 at the default ``d = 3``, 53 at ``d = 4``; the
default model's ``max_position_embeddings = 64`` fits ``max_digits <= 4``.
"""

from __future__ import annotations

import random

from workbench.tasks.base import TASKS, Example
from workbench.tasks.synthetic import Addition

COLUMN_CHARS = 9  # "a+b+c=ts,"
FINAL = ">"  # separates the scratchpad from the graded final answer


def scratchpad(a: int, b: int) -> str:
    """The full scratchpad of ``a + b`` (``a, b >= 0``): columns from the least significant, then
    ``>`` and the sum."""
    da, db = str(a)[::-1], str(b)[::-1]  # least significant digit first
    columns, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        columns.append(f"{x}+{y}+{carry}={s:02d},")
        carry = s // 10
    return "".join(columns) + FINAL + str(a + b)


def final_answer(text: str) -> str | None:
    """The stripped text after the last ``>``, or None when there is no ``>``."""
    if FINAL not in text:
        return None
    return text.rsplit(FINAL, 1)[1].strip()


@TASKS.register("scratchpad", summary="a+b= -> column-by-column scratchpad then >sum (graded on the sum only); "
                "operands of min_digits..max_digits digits")
class Scratchpad(Addition):
    """``"47+85="`` -> ``"7+5+0=12,4+8+1=13,>132"`` (module docstring: format, grading, lengths).
    Operands are drawn as in ``addition`` (digit count uniform in [min_digits, max_digits], then
    uniform among the numbers with that many digits). Defaults: 2-3 digit operands, answers of 22-33
    characters of which 4-6 (the column sums) are decisions."""

    name = "scratchpad"
    defaults = {"min_digits": 2, "max_digits": 3, "heldout_size": 256}

    # _validate: Addition's (the same params and ranges)

    def _draw(self, rng: random.Random) -> Example:
        a, b = self._operand(rng), self._operand(rng)
        return Example(f"{a}+{b}=", scratchpad(a, b))

    def verify(self, completion: str, example: Example) -> bool:
        """Exact match of the final answer (after the last ``>``); the scratchpad is not graded."""
        got = final_answer(completion)
        return got is not None and got == final_answer(example.answer)

    @property
    def alphabet(self) -> str:
        return "0123456789+=,>"

    @property
    def max_answer_tokens(self) -> int:
        d = self.params["max_digits"]
        return COLUMN_CHARS * d + len(FINAL) + (d + 1) + 1  # columns, ">", sum (carry digit), EOS


__all__ = ["Scratchpad", "scratchpad", "final_answer", "COLUMN_CHARS", "FINAL"]

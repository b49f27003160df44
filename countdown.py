"""Countdown, the environment of the blog ("Countdown" section): problems, a solver, the prompt,
and the rewards.

A problem is four integers in [1, 13] and a target in [1, 100] that some expression reaches,
using each number exactly once with + - * /. The model writes pairwise steps, each ending with
`</step>`, then the final expression inside `<answer>...</answer>`, e.g.

    13-4=9</step>9*3=27</step>27-3=24</step><answer>(13-4)*3-3</answer>

Training uses the blog's *dense reward* 1 - 2*min(|t - p| / t, 1) (the -1 floor when the
format is wrong), evaluation the *sparse reward* 0/1 "so we can intuit the scores" (mean@16).
Model output is never `eval`ed: the answer is parsed with `ast` against a small whitelist and
evaluated with exact `Fraction` arithmetic.

Interpretation choices (the blog gives no more detail):
- Targets are integers 1..100, each reachable with its four numbers; no (number multiset,
  target) pair is shared between train (20,000) and test (820).
- Well formatted: exactly one `<answer>...</answer>`, at the end, whose content parses (non-
  negative integer literals, binary + - * /, parentheses; no unary minus) within length, depth
  and literal bounds.
- The dense reward is -1 unless the answer is well formatted AND uses exactly the given
  numbers, each once, without dividing by zero: a policy cannot earn reward with other numbers.
  The sparse reward is 1 only for such an answer that equals the target exactly.
"""

from __future__ import annotations

import ast
import functools
import itertools
import operator
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

STEP_END = "</step>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"

N_NUMS = 4  # "Each sample consists of four input integers, between 1 and 13" (blog)
NUM_MIN, NUM_MAX = 1, 13
TARGET_MIN, TARGET_MAX = 1, 100  # our choice: the blog does not give the target range

MAX_ANSWER_CHARS = 200  # longer answers are not well formatted (bounds parsing work)
MAX_DEPTH = 20  # deepest allowed expression tree (a 4-number answer needs 3)
MAX_LITERAL_DIGITS = 6  # integer literals of more digits are rejected


@dataclass(frozen=True)
class Problem:
    nums: tuple[int, ...]  # 4 integers in [1, 13]
    target: int  # 1..100, reachable


# ---------------------------------------------------------------------------------------------
# Exact arithmetic shared by the solver and the answer checker.
# Values are ints when whole and Fractions otherwise: same dict keys, ints are much faster.

Value = int | Fraction


def _div(a: Value, b: Value) -> Value:
    return Fraction(a) / b  # raises ZeroDivisionError for b == 0


_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": _div}
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _apply(op: str, a: Value, b: Value) -> Value:
    r = _OPS[op](a, b)
    return r.numerator if r.denominator == 1 else r


# ---------------------------------------------------------------------------------------------
# Solver: memoised search over multisets. `_reachable(ms)` maps every value an expression over
# the multiset `ms` can take to one way of making it; sub-multisets are shared between problems,
# so labelling 20k problems reuses the 13 + 91 + 455 tables of sizes 1-3.


class _Node(NamedTuple):
    """How a value is made: `left op right`; operands are (multiset, value) keys into _reachable."""

    nice: bool  # every intermediate result (and the value) is a non-negative integer
    op: str  # "" for a leaf (a given number)
    left: tuple[tuple[int, ...], Value] | None = None
    right: tuple[tuple[int, ...], Value] | None = None


def _splits(ms: tuple[int, ...]) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each unordered split of a sorted multiset into two non-empty sorted sub-multisets, once."""
    seen = set()
    for mask in range(1, 2 ** (len(ms) - 1)):  # the last element always goes right
        a = tuple(x for i, x in enumerate(ms) if mask >> i & 1)
        b = tuple(x for i, x in enumerate(ms) if not mask >> i & 1)
        if a not in seen:
            seen.add(a)
            yield a, b


def _combinations(ms: tuple[int, ...]) -> Iterator[tuple[Value, _Node]]:
    """Every (value, node) obtained by combining the values of the two sides of a split."""
    for a_ms, b_ms in _splits(ms):
        a_table, b_table = _reachable(a_ms), _reachable(b_ms)
        for a, a_node in a_table.items():
            for b, b_node in b_table.items():
                children_nice = a_node.nice and b_node.nice
                big, small = ((a_ms, a), (b_ms, b)) if a >= b else ((b_ms, b), (a_ms, a))
                candidates = [("+", big, small), ("*", big, small), ("-", big, small),
                              ("-", small, big)]
                if b != 0:
                    candidates.append(("/", (a_ms, a), (b_ms, b)))
                if a != 0:
                    candidates.append(("/", (b_ms, b), (a_ms, a)))
                for op, left, right in candidates:
                    value = _apply(op, left[1], right[1])
                    nice = children_nice and type(value) is int and value >= 0
                    yield value, _Node(nice, op, left, right)


@functools.cache
def _reachable(ms: tuple[int, ...]) -> dict[Value, _Node]:
    """value -> node for a sorted multiset, keeping a 'nice' node whenever one exists."""
    if len(ms) == 1:
        return {ms[0]: _Node(ms[0] >= 0, "")}
    table: dict[Value, _Node] = {}
    for value, node in _combinations(ms):
        old = table.get(value)
        if old is None or (node.nice and not old.nice):
            table[value] = node
    return table


def _solution(nums: tuple[int, ...] | list[int], target: int) -> tuple[_Node, Value] | None:
    """(node, value) of a solution, preferring one whose steps are all non-negative integers."""
    ms = tuple(sorted(nums))
    if len(ms) == 1:
        return (_reachable(ms)[ms[0]], ms[0]) if ms[0] == target else None
    found = None
    for value, node in _combinations(ms):
        if value == target:
            if node.nice:
                return node, value
            found = found or (node, value)
    return found


def _child(key: tuple[tuple[int, ...], Value]) -> tuple[_Node, Value]:
    return _reachable(key[0])[key[1]], key[1]


def _expression(node: _Node, value: Value) -> tuple[str, int]:
    """(text, precedence) of the expression for `node`, with only the parentheses it needs."""
    if not node.op:
        return str(value), 3
    prec = _PRECEDENCE[node.op]
    left, left_prec = _expression(*_child(node.left))
    right, right_prec = _expression(*_child(node.right))
    if left_prec < prec:
        left = f"({left})"
    if right_prec < prec or (right_prec == prec and node.op in "-/"):
        right = f"({right})"
    return f"{left}{node.op}{right}", prec


def _operand(value: Value) -> str:
    """A step operand: fractions ("a/b") and negatives go in parentheses so "8/(1/3)" reads right."""
    return str(value) if type(value) is int and value >= 0 else f"({value})"


def _steps(node: _Node, value: Value) -> list[str]:
    if not node.op:
        return []
    step = f"{_operand(node.left[1])}{node.op}{_operand(node.right[1])}={value}"
    return _steps(*_child(node.left)) + _steps(*_child(node.right)) + [step]


def solve(nums: tuple[int, ...] | list[int], target: int) -> str | None:
    """One expression using each number exactly once that equals `target`, or None."""
    solution = _solution(nums, target)
    return None if solution is None else _expression(*solution)[0]


def solve_steps(nums: tuple[int, ...] | list[int], target: int) -> list[str] | None:
    """The same solution as `solve`, as pairwise steps like "13-4=9" (integers when possible)."""
    solution = _solution(nums, target)
    return None if solution is None else _steps(*solution)


def solution_trace(problem: Problem) -> str:
    """A correct completion (steps, then the answer): the tiny model's warm-start text."""
    solution = _solution(problem.nums, problem.target)
    if solution is None:
        raise ValueError(f"no solution for {problem}")
    steps = "".join(step + STEP_END for step in _steps(*solution))
    return f"{steps}{ANSWER_OPEN}{_expression(*solution)[0]}{ANSWER_CLOSE}"


# ---------------------------------------------------------------------------------------------
# Data: the blog trains on 20,000 problems and evaluates on 820.


@functools.cache
def _targets(ms: tuple[int, ...]) -> tuple[int, ...]:
    """Reachable integer targets in [TARGET_MIN, TARGET_MAX] for a sorted multiset."""
    return tuple(sorted({v for v, _ in _combinations(ms)
                         if type(v) is int and TARGET_MIN <= v <= TARGET_MAX}))


def make_splits(seed: int = 0, n_train: int = 20000,
                n_test: int = 820) -> tuple[list[Problem], list[Problem]]:
    """Deterministic (train, test): numbers drawn uniformly, then a reachable target uniformly.

    No (sorted numbers, target) pair appears twice, in a split or across splits.
    """
    all_multisets = itertools.combinations_with_replacement(range(NUM_MIN, NUM_MAX + 1), N_NUMS)
    available = sum(len(_targets(ms)) for ms in all_multisets)  # fills the cache used below
    if n_train + n_test > available:
        raise ValueError(f"asked for {n_train + n_test} problems, only {available} distinct "
                         f"(numbers, target) pairs exist")
    rng = random.Random(seed)
    seen: set[tuple[tuple[int, ...], int]] = set()
    problems: list[Problem] = []
    while len(problems) < n_train + n_test:
        nums = tuple(rng.randint(NUM_MIN, NUM_MAX) for _ in range(N_NUMS))
        targets = _targets(tuple(sorted(nums)))
        if not targets:
            continue
        target = rng.choice(targets)
        if (tuple(sorted(nums)), target) not in seen:
            seen.add((tuple(sorted(nums)), target))
            problems.append(Problem(nums, target))
    return problems[n_test:], problems[:n_test]


# ---------------------------------------------------------------------------------------------
# Prompt


def make_prompt(problem: Problem, tokenizer=None, style: str | None = None) -> str:
    """The full prompt, chat-templated when the tokenizer has a template.

    Two message styles: "instruct" (default) states the task in words, for instruct models such
    as Qwen-2.5-Instruct; "short" gives only the numbers and the target, for the embedded
    character-level tiny model, which learns the format from its warm start and for which every
    prompt character is a token (the instruct message made ~70% of each training sequence).
    A tokenizer declares its style as `countdown_prompt` in its tokenizer_config.json."""
    style = style or getattr(tokenizer, "init_kwargs", {}).get("countdown_prompt", "instruct")
    nums = " ".join(map(str, problem.nums))
    if style == "short":
        msg = f"Use {nums} to make {problem.target}."
    elif style == "instruct":
        msg = (f"Use {nums} to make {problem.target} with + - * /, each once. "
               f"End steps with {STEP_END}, answer in {ANSWER_OPEN}{ANSWER_CLOSE}.")
    else:
        raise ValueError(f"unknown prompt style {style!r}; expected 'instruct' or 'short'")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return msg + "\n"
    return tokenizer.apply_chat_template([{"role": "user", "content": msg}],
                                         add_generation_prompt=True, tokenize=False)


def prompt_ids(problem: Problem, tokenizer) -> list[int]:
    """The prompt as token ids; the chat template already holds the special tokens."""
    return tokenizer(make_prompt(problem, tokenizer), add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------
# Answer checking: parse, never eval.

_ALLOWED_CHARS = re.compile(r"[0-9+\-*/()\s]+")
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


class _NotInGrammar(Exception):
    pass


def parse_answer(text: str) -> str | None:
    """The stripped text inside the answer tags, or None unless the completion has exactly one
    `<answer>` and one `</answer>`, in that order, with only whitespace after `</answer>`."""
    if not isinstance(text, str) or text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return None
    head, _, rest = text.partition(ANSWER_OPEN)
    inner, _, tail = rest.partition(ANSWER_CLOSE)
    if ANSWER_CLOSE in head or tail.strip():
        return None
    return inner.strip()


def _walk(node: ast.AST, depth: int, literals: list[int]) -> Fraction | None:
    """Exact value of a whitelisted expression tree; None after a division by zero."""
    if depth > MAX_DEPTH:
        raise _NotInGrammar
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if node.value >= 10 ** MAX_LITERAL_DIGITS:
            raise _NotInGrammar
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:  # no unary minus, no **, //
        left = _walk(node.left, depth + 1, literals)
        right = _walk(node.right, depth + 1, literals)
        if left is None or right is None or (right == 0 and isinstance(node.op, ast.Div)):
            return None
        return Fraction(_OPS[_AST_OPS[type(node.op)]](left, right))
    raise _NotInGrammar


def _parse(expr: str) -> tuple[Fraction | None, list[int]] | None:
    """(value or None on division by zero, integer literals in order), or None if `expr` is not
    integers combined with binary + - * / and parentheses."""
    if len(expr) > MAX_ANSWER_CHARS or not _ALLOWED_CHARS.fullmatch(expr):
        return None
    try:
        tree = ast.parse(" ".join(expr.split()), mode="eval")  # newlines/tabs read as spaces
        literals: list[int] = []
        return _walk(tree.body, 0, literals), literals
    except (SyntaxError, ValueError, RecursionError, MemoryError, _NotInGrammar):
        return None


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and the integer literals used, or None (not in the grammar, or division by 0)."""
    parsed = _parse(expr)
    return None if parsed is None or parsed[0] is None else (parsed[0], parsed[1])


def is_well_formatted(text: str) -> bool:
    """Format correct: one `<answer>...</answer>` pair ending the completion (see parse_answer)
    around an expression in the grammar (ints, binary + - * /, parentheses; <= 200 chars)."""
    answer = parse_answer(text)
    return answer is not None and _parse(answer) is not None


def _checked_value(text: str, problem: Problem) -> Fraction | None:
    """The answer's exact value if it is well formatted and uses each given number exactly once."""
    answer = parse_answer(text)
    result = None if answer is None else evaluate_expression(answer)
    if result is None or sorted(result[1]) != sorted(problem.nums):
        return None  # a wrong multiset must not earn a high reward, or the policy learns to cheat
    return result[0]


def dense_reward(text: str, problem: Problem) -> float:
    """The blog's training reward: 1 - 2*min(|t - p| / t, 1) if formatting is correct, else -1.
    "Correct" also requires each given number used exactly once and no division by zero."""
    p = _checked_value(text, problem)
    if p is None:
        return -1.0
    t = problem.target
    return float(1 - 2 * min(abs(t - p) / t, Fraction(1)))


def sparse_reward(text: str, problem: Problem) -> float:
    """The blog's eval reward (0/1 for correctness), averaged into mean@16."""
    return 1.0 if _checked_value(text, problem) == problem.target else 0.0


if __name__ == "__main__":
    import time

    start = time.perf_counter()
    train, test = make_splits()
    print(f"make_splits: {len(train)} train, {len(test)} test "
          f"in {time.perf_counter() - start:.1f}s")
    for p in test[:3]:
        print(p, "->", solve(p.nums, p.target))
    p = test[0]
    trace = solution_trace(p)
    print("prompt:", make_prompt(p), end="")
    print("trace: ", trace)
    wrong = f"{ANSWER_OPEN}{'+'.join(map(str, p.nums))}{ANSWER_CLOSE}"
    for name, text in [("solver trace", trace), ("sum of the numbers", wrong),
                       ("garbage", "I give up"), ("missing numbers", f"<answer>{p.nums[0]}</answer>")]:
        print(f"{name:20s} dense {dense_reward(text, p):+.3f} sparse {sparse_reward(text, p):.0f}"
              f"  {text!r}")

"""countdown.py: rewards against values computed by hand, fuzzing, the solver against an
independent brute force, and the splits."""

import ast
import itertools
import random
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import countdown
from countdown import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    MAX_ANSWER_CHARS,
    MAX_DEPTH,
    MAX_LITERAL_DIGITS,
    STEP_END,
    Problem,
    dense_reward,
    evaluate_expression,
    is_well_formatted,
    make_prompt,
    make_splits,
    parse_answer,
    prompt_ids,
    solution_trace,
    solve,
    solve_steps,
    sparse_reward,
)

P = Problem((4, 3, 13, 3), 24)  # (13-4)*3-3 = 24


def ans(expr: str) -> str:
    return f"{ANSWER_OPEN}{expr}{ANSWER_CLOSE}"


# --- rewards on hand-written completions -------------------------------------------------------

@pytest.mark.parametrize("text, dense, sparse", [
    (ans("(13-4)*3-3"), 1.0, 1.0),
    ("13-4=9</step>9*3=27</step>27-3=24</step>" + ans("(13-4)*3-3"), 1.0, 1.0),
    (ans("((((13-4))*(3))-(3))"), 1.0, 1.0),                 # nested parentheses
    (ans(" ( 13 - 4 ) *\n3\t- 3 ") + " \n", 1.0, 1.0),       # whitespace anywhere
    (ans("13+4+3/3"), 0.5, 0.0),                             # 18: 1 - 2*6/24 = 0.5
    (ans("13+4+3-3"), 1 - 14 / 24, 0.0),                     # 17: 1 - 2*7/24 = 10/24
    (ans("13/4*3*3"), 0.5625, 0.0),                          # 117/4: 1 - 2*(21/4)/24 = 0.5625
    (ans("13-4-3-3"), -0.75, 0.0),                           # 3: 1 - 2*21/24 = -0.75
    (ans("13*4*3*3"), -1.0, 0.0),                            # 468: min(444/24, 1) = 1 -> -1
    (ans("(13-4)*3-4"), -1.0, 0.0),                          # reused 4, missing a 3
    (ans("(13-4)*3"), -1.0, 0.0),                            # missing a 3 (value 27)
    (ans("(13-4)*3-3+0"), -1.0, 0.0),                        # extra number
    (ans("(13-4)*3-3*1"), -1.0, 0.0),                        # extra number, value still 24
    (ans("13*4/(3-3)"), -1.0, 0.0),                          # division by zero
    (ans("-(4-13)*3-3"), -1.0, 0.0),                         # unary minus is not in the grammar
    (ans("(13-4)*3-3") + ans("(13-4)*3-3"), -1.0, 0.0),      # two answer tags
    ("(13-4)*3-3", -1.0, 0.0),                               # no tag
    (ans("(13-4)*3-3") + " thanks", -1.0, 0.0),              # text after the answer
    (ANSWER_OPEN + "(13-4)*3-3", -1.0, 0.0),                 # unclosed
    (ANSWER_CLOSE + "(13-4)*3-3" + ANSWER_OPEN, -1.0, 0.0),  # tags in the wrong order
    (ans("(13-4)*3.0-3"), -1.0, 0.0),                        # float literal
    (ans("(13-4)**1*3-3"), -1.0, 0.0),                       # power
    (ans("(13-4)//1*3-3"), -1.0, 0.0),                       # floor division
    (ans("1_3-4*3-3"), -1.0, 0.0),                           # underscore literal
    (ans("__import__('os')"), -1.0, 0.0),                    # code
    (ans(""), -1.0, 0.0),
    ("I think the answer is 24", -1.0, 0.0),                 # garbage
    ("", -1.0, 0.0),
])
def test_rewards_by_hand(text, dense, sparse):
    assert dense_reward(text, P) == pytest.approx(dense, abs=1e-12)
    assert sparse_reward(text, P) == sparse


def test_format_definition():
    assert is_well_formatted(ans("(13-4)*3-3"))
    assert is_well_formatted(ans("1+2"))             # wrong numbers, still well formatted
    assert is_well_formatted(ans("13*4/(3-3)"))      # in the grammar, only its value is missing
    assert not is_well_formatted(ans("1+"))
    assert not is_well_formatted(ans("-1+2"))
    assert not is_well_formatted(ans("1+2") + "x")
    assert not is_well_formatted(ans("1+2") * 2)
    assert parse_answer("9*3=27</step>" + ans(" 1 + 2 ") + "\n") == "1 + 2"
    assert parse_answer(ans("1") + ans("1")) is None


def test_exact_fractions():
    assert evaluate_expression("1/3+1/6") == (Fraction(1, 2), [1, 3, 1, 6])
    assert evaluate_expression("1/(2-2)") is None
    assert evaluate_expression("2*(3+4)") == (Fraction(14), [2, 3, 4])
    # 8/(3-8/3) is 23.999... in floats; exactly 24 here
    assert sparse_reward(ans("8/(3-8/3)"), Problem((3, 3, 8, 8), 24)) == 1.0


@pytest.mark.parametrize("text", [
    ans("(" * 5000 + "1" + ")" * 5000),        # deep nesting
    ans("(" * 99 + "1" + ")" * 99),            # just under the length bound
    ans("+".join(["1"] * 1000)),               # very long expression
    ans("9" * 150),                            # huge literal
    ans("13" + "*13" * 60),                    # huge value
    ans("1/" * 60 + "1"),                      # long division chain
    "x" * 1_000_000 + ans("1+2"),              # very long completion
    ans("\x00"), ans("١+٢"), ans("\u00a013"), ans("1+2\n\n3"),
    None, b"<answer>3*(13-4)-3</answer>",       # not a string (bytes: right, yet not text)
])
def test_rewards_survive_hostile_input(text):
    assert dense_reward(text, P) == -1.0
    assert sparse_reward(text, P) == 0.0


def test_each_parser_limit_turns_an_otherwise_scoring_answer_away():
    """Inputs that score without the limit (the problem's own numbers, an exact answer, a
    well-formed expression), so lifting MAX_ANSWER_CHARS, MAX_DEPTH or MAX_LITERAL_DIGITS fails
    here, not only on inputs that score -1 anyway."""
    exact = Problem((1, 2, 3, 4), 10)
    pad = MAX_ANSWER_CHARS - len("1+2+3+4")
    at_limit, over = "1+" + " " * pad + "2+3+4", "1+" + " " * (pad + 1) + "2+3+4"
    assert sparse_reward(ans(at_limit), exact) == 1.0  # whitespace inside the tags is allowed
    assert dense_reward(ans(over), exact) == -1.0 and sparse_reward(ans(over), exact) == 0.0
    # depth: a left-leaning chain of n additions is n deep (the root BinOp at depth 0)
    chain = "+".join(["1"] * (MAX_DEPTH + 1))  # MAX_DEPTH additions: leaves at MAX_DEPTH
    assert is_well_formatted(ans(chain))
    assert not is_well_formatted(ans(chain + "+1"))
    # and right-leaning: 1+(1+(1+...)) counts its depth the same way
    nested = "1+(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH  # MAX_DEPTH additions
    assert is_well_formatted(ans(nested))
    assert not is_well_formatted(ans("1+(" + nested + ")"))
    biggest = "9" * MAX_LITERAL_DIGITS
    assert is_well_formatted(ans(biggest)) and not is_well_formatted(ans(biggest + "9"))
    # an exact answer with one literal over the bound (13 * 10^6 / 10^6 ...) is turned away too
    big = "1" + "0" * MAX_LITERAL_DIGITS
    assert dense_reward(ans(f"(1+2+3+4)*{big}/{big}"), Problem((1, 2, 3, 4, int(big), int(big)),
                                                               10)) == -1.0
    assert dense_reward(ans("(1+2+3+4)*999999/999999"), Problem((1, 2, 3, 4, 999999, 999999),
                                                                 10)) == 1.0


# --- fuzzing -------------------------------------------------------------------------------------

_expr_chars = st.text(alphabet="0123456789+-*/() \n", max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), _expr_chars.map(ans),
                 st.tuples(st.text(max_size=30), _expr_chars).map(lambda t: t[0] + ans(t[1]))))
def test_rewards_never_raise(text):
    d, s = dense_reward(text, P), sparse_reward(text, P)
    assert -1.0 <= d <= 1.0 and s in (0.0, 1.0)
    assert isinstance(is_well_formatted(text), bool)


OPS = "+-*/"


@st.composite
def expression_trees(draw, nums):
    """A random binary tree over a permutation of `nums`: ints at the leaves, (op, l, r) inside."""
    items = list(draw(st.permutations(nums)))
    while len(items) > 1:
        i = draw(st.integers(0, len(items) - 2))
        items[i:i + 2] = [(draw(st.sampled_from(OPS)), items[i], items[i + 1])]
    return items[0]


def tree_value(tree):
    """Independent exact evaluation; None on division by zero."""
    if isinstance(tree, int):
        return Fraction(tree)
    op, l, r = tree[0], tree_value(tree[1]), tree_value(tree[2])
    if l is None or r is None or (op == "/" and r == 0):
        return None
    return {"+": l + r, "-": l - r, "*": l * r, "/": l / r if r else None}[op]


def tree_text(tree):
    return str(tree) if isinstance(tree, int) else f"({tree_text(tree[1])}{tree[0]}{tree_text(tree[2])})"


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_trees_agree_with_independent_evaluation(data):
    nums = tuple(data.draw(st.lists(st.integers(1, 13), min_size=4, max_size=4)))
    problem = Problem(nums, data.draw(st.integers(1, 100)))
    tree = data.draw(expression_trees(nums))
    text = ans(tree_text(tree))
    p = tree_value(tree)
    assert sparse_reward(text, problem) == (1.0 if p == problem.target else 0.0)
    t = problem.target
    expected = -1.0 if p is None else float(1 - 2 * min(abs(t - p) / t, Fraction(1)))
    assert dense_reward(text, problem) == expected
    # the same tree over a different multiset can never score above -1
    other = tree_text(data.draw(expression_trees(nums[:3] + (nums[3] % 13 + 1,))))
    assert dense_reward(ans(other), problem) == -1.0
    assert sparse_reward(ans(other), problem) == 0.0


def value_bits(v: Fraction) -> int:
    """Bits of the larger of |numerator| and denominator (log2 of the value's height)."""
    return max(v.numerator.bit_length(), v.denominator.bit_length())


def height_bound(literals: list[int]) -> int:
    """The height H = max(|p|, q) of p/q obeys H(x op y) <= 2 H(x) H(y) for + - * / (a/b + c/d =
    (ad + bc) / bd, and reducing only lowers it), so an answer's value has at most
    sum(bits(literal) + 1) + 1 bits above and below the fraction bar."""
    return sum(n.bit_length() + 1 for n in literals) + 1


def balanced(op: str, leaves: list[str]) -> str:
    """A balanced, fully parenthesised tree of `leaves` under `op`: depth ~log2(len(leaves))."""
    if len(leaves) == 1:
        return leaves[0]
    mid = len(leaves) // 2
    return f"({balanced(op, leaves[:mid])}{op}{balanced(op, leaves[mid:])})"


def test_parse_work_of_the_worst_allowed_answers_is_bounded():
    """Exact Fractions can grow without bound (9**9**9 would not finish); the grammar keeps every
    value within 4 bits per character of the answer (`height_bound`: a literal of d <= 6 digits
    has at most 3.33 d + 1 bits, plus 1 per operation). So the longest allowed answer is at most
    ~100 operations on integers of at most ~800 bits: microseconds."""
    big = "9" * MAX_LITERAL_DIGITS
    worst = []
    for op in "*/+-":  # as many of the largest literals as fit, balanced to stay within MAX_DEPTH
        n = max(k for k in range(1, 64) if len(balanced(op, [big] * k)) <= MAX_ANSWER_CHARS)
        worst.append(balanced(op, [big] * n))
    # a continued fraction: each level an addition and a division (2 deeper), as deep as allowed
    cf = big
    for _ in range(MAX_DEPTH // 2):
        cf = f"{big}+1/({cf})"
    worst.append(cf)
    for expr in worst:
        parsed = evaluate_expression(expr)
        assert parsed is not None, expr  # allowed: within every limit
        value, literals = parsed
        assert value_bits(value) <= height_bound(literals) <= 4 * len(expr)
    product = evaluate_expression(worst[0])
    assert product[0] == 999999 ** len(product[1]) and len(product[1]) >= 20


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_value_size_is_bounded_by_the_literals(data):
    """Any allowed answer stays within `height_bound`; an operator that breaks it (say **) fails
    here."""
    literals = data.draw(st.lists(st.integers(1, 10 ** MAX_LITERAL_DIGITS - 1), min_size=1,
                                  max_size=12))
    expr = tree_text(data.draw(expression_trees(tuple(literals))))
    parsed = evaluate_expression(expr)
    if parsed is None:  # a division by zero, or over the length / depth limits
        return
    assert value_bits(parsed[0]) <= height_bound(parsed[1])


# --- solver --------------------------------------------------------------------------------------

def brute_force_values(nums, keep=lambda v: True):
    """All values reachable by repeatedly combining two numbers of the list, every step's result
    passing `keep` (independent of the multiset memo in countdown.py)."""
    if len(nums) == 1:
        return {nums[0]}
    out = set()
    for i, j in itertools.permutations(range(len(nums)), 2):
        rest = [x for k, x in enumerate(nums) if k not in (i, j)]
        a, b = nums[i], nums[j]
        for v in {a + b, a - b, a * b} | ({a / b} if b else set()):
            if keep(v):
                out |= brute_force_values(rest + [v], keep)
    return out


_NUMBER = r"(\d+|\(-?\d+(?:/\d+)?\))"
_STEP = re.compile(rf"{_NUMBER}([+\-*/]){_NUMBER}=(-?\d+(?:/\d+)?)")


def parse_step(step):
    """"(8/3)-1=5/3" -> (Fraction(8, 3), "-", 1, Fraction(5, 3)); the step must match the form."""
    m = _STEP.fullmatch(step)
    assert m, step
    return tuple(Fraction(g.strip("()")) if i != 1 else g for i, g in enumerate(m.groups()))


def check_steps(steps, nums, target):
    """Each step is right and consumes two numbers of the current pool; the last leaves the target."""
    pool = [Fraction(x) for x in nums]
    for step in steps:
        a, op, b, c = parse_step(step)
        assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else None}[op] == c, step
        pool.remove(a)
        pool.remove(b)
        pool.append(c)
    assert pool == [target]


def test_solver_on_1000_random_problems():
    rng = random.Random(1)
    solved = 0
    for _ in range(1000):
        nums = tuple(rng.randint(1, 13) for _ in range(4))
        target = rng.randint(1, 100)
        expr = solve(nums, target)
        if expr is None:
            continue
        solved += 1
        problem = Problem(nums, target)
        assert sparse_reward(ans(expr), problem) == 1.0, (problem, expr)
        trace = solution_trace(problem)
        assert sparse_reward(trace, problem) == 1.0, trace
        steps = solve_steps(nums, target)
        assert trace == "".join(s + STEP_END for s in steps) + ans(expr)
        check_steps(steps, nums, target)
    assert solved > 500


def test_solver_matches_brute_force():
    rng = random.Random(2)
    for _ in range(25):
        nums = [rng.randint(1, 13) for _ in range(4)]
        reachable = brute_force_values([Fraction(x) for x in nums])
        for target in range(1, 101):
            assert (solve(nums, target) is not None) == (target in reachable), (nums, target)


def test_solver_prefers_integer_steps():
    assert solve_steps((4, 3, 13, 3), 24) == ["13-4=9", "9*3=27", "27-3=24"]
    for nums, target in [((1, 2, 3, 4), 24), ((13, 12, 11, 10), 100), ((2, 3, 4, 6), 1)]:
        steps = solve_steps(nums, target)
        check_steps(steps, nums, target)
        assert all(re.fullmatch(r"\d+[+\-*/]\d+=\d+", s) for s in steps), steps
    # these need fractions: 8/(3-8/3), 5*(5-1/5), 7*(3+3/7)
    for nums in [(3, 3, 8, 8), (5, 5, 5, 1), (7, 7, 3, 3)]:
        steps = solve_steps(nums, 24)
        check_steps(steps, nums, 24)
        assert any("/" in s.split("=")[1] for s in steps), steps


def integer_values(nums, least=0):
    """Values reachable with every step's result an integer >= `least` (the classic game's rule;
    independent of countdown.py's 'nice' nodes)."""
    return brute_force_values([Fraction(x) for x in nums],
                              lambda v: v.denominator == 1 and v >= least)


def test_solver_takes_an_integer_path_whenever_one_exists():
    """The warm start's traces use integer steps when the problem allows (fractions only when it
    needs them): checked against the independent integer-only search, zero steps included."""
    # (1, 1, 4, 5) -> 4: integer paths only through a zero (4 + 5 * (1 - 1)), and the first
    # solution the search meets is all fractions (1 / (5/4 - 1))
    assert 4 in integer_values([1, 1, 4, 5]) and 4 not in integer_values([1, 1, 4, 5], least=1)
    rng = random.Random(3)
    problems = [((1, 1, 4, 5), 4)] + [
        (tuple(rng.randint(1, 13) for _ in range(4)), rng.randint(1, 100)) for _ in range(300)]
    for nums, target in problems:
        steps = solve_steps(nums, target)
        if steps is None:
            continue
        check_steps(steps, nums, target)
        integer = all(re.fullmatch(r"\d+[+\-*/]\d+=\d+", s) for s in steps)
        assert integer == (target in integer_values(list(nums))), (nums, target, steps)
        for a, op, b, _ in map(parse_step, steps):  # "13+4", not "4+13"
            assert op not in "+*" or a >= b, steps


def _fraction_value(expr: str) -> Fraction:
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}

    def walk(node):
        if isinstance(node, ast.BinOp):
            return ops[type(node.op)](walk(node.left), walk(node.right))
        return Fraction(node.value)  # the literals are substituted integers
    return walk(ast.parse(expr, mode="eval").body)


def test_solver_writes_only_the_parentheses_it_needs():
    """Dropping any pair of parentheses from an answer changes it as a function of its numbers
    (checked at random numbers, so 8-(3-0) vs 8-3-0 is not fooled by a zero): none is redundant."""
    rng = random.Random(4)
    checked = 0
    for _ in range(300):
        nums, target = tuple(rng.randint(1, 13) for _ in range(4)), rng.randint(1, 100)
        expr = solve(nums, target)
        if expr is None or "(" not in expr:
            continue
        stack, pairs = [], []
        for i, c in enumerate(expr):
            if c == "(":
                stack.append(i)
            elif c == ")":
                pairs.append((stack.pop(), i))
        for i, j in pairs:
            dropped = expr[:i] + expr[i + 1:j] + expr[j + 1:]
            points = [[rng.randint(1, 10**6) for _ in range(4)] for _ in range(3)]

            def at(text, xs):
                it = iter(xs)
                return _fraction_value(re.sub(r"\d+", lambda m: str(next(it)), text))
            assert any(at(expr, xs) != at(dropped, xs) for xs in points), (expr, dropped)
            checked += 1
    assert checked > 100


@pytest.mark.timeout(60)  # without its guard make_splits would look for a pair that does not exist
def test_splits_cover_every_pair_once_and_refuse_one_more(monkeypatch):
    """On numbers 1..3 (monkeypatched) the pairs can be counted by brute force: asking for all of
    them returns each (sorted numbers, reachable target) exactly once; one more is refused."""
    monkeypatch.setattr(countdown, "NUM_MAX", 3)
    pairs = {(ms, t) for ms in itertools.combinations_with_replacement(range(1, 4), 4)
             for v in brute_force_values([Fraction(x) for x in ms])
             if v.denominator == 1 and 1 <= (t := int(v)) <= 100}
    with pytest.raises(ValueError, match=f"only {len(pairs)} distinct"):
        make_splits(0, n_train=10**6)
    train, test = make_splits(0, n_train=len(pairs) - 10, n_test=10)
    assert sorted((tuple(sorted(p.nums)), p.target) for p in train + test) == sorted(pairs)
    with pytest.raises(ValueError, match=f"asked for {len(pairs) + 1} problems, only {len(pairs)}"):
        make_splits(0, n_train=len(pairs) - 9, n_test=10)


def test_unsolvable():
    assert solve((1, 1, 1, 1), 100) is None
    assert solve((7,), 8) is None and solve((7,), 7) == "7" and solve_steps((7,), 7) == []
    assert solve_steps((1, 1, 1, 1), 100) is None
    with pytest.raises(ValueError, match="no solution"):
        solution_trace(Problem((1, 1, 1, 1), 100))


# --- prompt --------------------------------------------------------------------------------------

class FakeTokenizer:
    def __init__(self, chat_template):
        self.chat_template = chat_template

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt is True and tokenize is False  # text, open for the reply
        [m] = messages
        return f"<{m['role']}>{m['content']}</{m['role']}><assistant>"


class BareTokenizer:
    """No chat_template attribute at all (a plain tokenizer object)."""


def test_prompt():
    msg = ("Use 4 3 13 3 to make 24 with + - * /, each once. "
           "End steps with </step>, answer in <answer></answer>.")
    assert make_prompt(P) == msg + "\n"
    assert make_prompt(P, FakeTokenizer(None)) == msg + "\n"
    assert make_prompt(P, FakeTokenizer("{{ messages }}")) == f"<user>{msg}</user><assistant>"
    assert make_prompt(P, BareTokenizer()) == msg + "\n"
    assert len(make_prompt(Problem((13, 13, 13, 13), 100))) <= 110
    # "short" (the tiny model): asked for, or declared by the tokenizer's config
    assert make_prompt(P, style="short") == "Use 4 3 13 3 to make 24.\n"
    short_tok = FakeTokenizer(None)
    short_tok.init_kwargs = {"countdown_prompt": "short"}
    assert make_prompt(P, short_tok) == "Use 4 3 13 3 to make 24.\n"
    assert make_prompt(P, short_tok, style="instruct") == msg + "\n"
    with pytest.raises(ValueError, match="unknown prompt style"):
        make_prompt(P, style="long")


# --- splits and files ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def splits():
    return make_splits()


def test_default_splits(splits):
    train, test = splits
    assert (len(train), len(test)) == (20000, 820)
    keys = [(tuple(sorted(p.nums)), p.target) for p in train + test]
    assert len(set(keys)) == len(keys)  # no duplicates within or across splits
    for p in train + test:
        assert len(p.nums) == 4 and all(1 <= x <= 13 for x in p.nums) and 1 <= p.target <= 100
    for p in test:
        assert sparse_reward(ans(solve(p.nums, p.target)), p) == 1.0
    assert len({p.target for p in test}) > 80  # targets spread over the range


def test_splits_deterministic(splits):
    assert make_splits(0) == splits
    assert make_splits(1, n_train=200, n_test=50) == make_splits(1, n_train=200, n_test=50)
    assert make_splits(1, n_train=200, n_test=50) != make_splits(2, n_train=200, n_test=50)
    with pytest.raises(ValueError, match="distinct"):
        make_splits(n_train=10**6)


def test_prompt_ids_are_the_tokenizers_templated_short_prompt():
    """The tiny tokenizer declares the short style and carries Qwen's chat template: one token
    per character, the template's markers one token each."""
    import tiny

    tok = tiny.build_tokenizer()
    ids = prompt_ids(P, tok)
    text = "<|im_start|>user\nUse 4 3 13 3 to make 24.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids) == text
    # one token per character but the 3 markers: 74 characters, 2 x 12 + 10 of them markers
    assert len(ids) == len(text) - 2 * (len("<|im_start|>") - 1) - (len("<|im_end|>") - 1) == 43


@pytest.mark.parametrize("nums, target, expr, steps", [
    ((4, 3, 13, 3), 24, "(13-4)*3-3", ["13-4=9", "9*3=27", "27-3=24"]),
    ((2, 3, 5, 7), 1, "2-(3-(7-5))", ["7-5=2", "3-2=1", "2-1=1"]),  # right operands of - keep ()
    ((6, 6, 6, 6), 1, "6/(6+6-6)", ["6+6=12", "12-6=6", "6/6=1"]),
    ((8, 3, 8, 3), 24, "8/(3-8/3)", ["8/3=8/3", "3-(8/3)=1/3", "8/(1/3)=24"]),  # no integer path
])
def test_solver_output_by_hand(nums, target, expr, steps):
    """The exact strings (checked by hand: each evaluates to the target, parentheses only where
    precedence needs them, integer steps when there are some): they are the warm start's SFT
    traces, so a change in their form changes the shipped model's data."""
    assert solve(nums, target) == expr and solve_steps(nums, target) == steps

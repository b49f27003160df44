"""Imports run one way, downhill (STYLE.md, "Layering"): the graph of the top-level modules, read
from the code with `ast` (imports inside functions included: a lazy import that closes a loop is
a circle all the same), has no cycle."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = {p.stem for p in REPO.glob("*.py")}
# the one allowed back edge: sampler.make_sampler("vllm") imports the optional vLLM backend
# lazily (sampler_vllm builds on TorchSampler; vllm is not installed everywhere)
OPTIONAL = {("sampler", "sampler_vllm")}


def imports_of(path: Path) -> set[str]:
    """Our modules that `path` imports anywhere in its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & MODULES


def import_graph() -> dict[str, set[str]]:
    return {m: imports_of(REPO / f"{m}.py") - {m} for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_by_hand():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": set(), "b": {"b"}}) == ["b", "b"]


def test_top_level_imports_have_no_cycle():
    graph = import_graph()
    for a, b in OPTIONAL:
        assert b in graph[a], f"{a} no longer imports {b}: drop it from OPTIONAL"
        graph[a] = graph[a] - {b}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_bottom_layer_imports_nothing_of_ours():
    graph = import_graph()
    assert graph["countdown"] == graph["losses"] == graph["value_head"] == set()
    # building the tiny model needs neither evaluation nor sampling
    assert graph["tiny"] == {"countdown", "value_head"}

"""The package layers (docs/design.md, "Layout"), checked on the source: every module of core/,
learners/, actors/, rewards/, serve/, cluster/ and protege/ is parsed (AST, nothing is imported),
and every import in it counts, at module level or inside a function: a lazy import is still a
dependency, it only moves the moment it fails.

Each rule is its own test and prints every violation as ``path:line: what`` so the fix is plain:

- ``test_no_import_cycles``: no cycle between modules.
- ``test_package_directions``: a package imports only the packages below it (``ALLOWED``):
  core -> nothing; learners -> core; actors -> core; rewards -> core, actors;
  serve -> core, actors; cluster -> core, learners, actors, rewards, serve;
  protege/ (cli.py, demo.py, jobs_cli.py: the entry points) -> anything.
- ``test_heavy_import_doors``: vLLM and DeepSpeed are imported only by the modules listed in
  ``DOORS``, plain classes become Ray actors (``ray.remote``) only in cluster/launch.py, and the
  light modules in ``LIGHT`` (what the CLI and the REST front ends load to validate a spec)
  import only the standard library and the few packages listed for them.
- ``test_algorithm_seams``: what differs between algorithms lives behind the algorithm seam
  (core/spec.py declares the algorithms, learners/algorithms.py implements them). Anywhere else
  these are violations:
  * ``X.type`` compared (``==``, ``!=``, ``in``, ``not in``, either side) or matched
    (``match X.type:``) where X ends in a name ``algorithm`` or ``algo`` (``algo``,
    ``spec.algorithm``, ``self.algo``, ``teacher_algo``, ...). Other ``.type`` attributes (a
    reward's, a message's) are not algorithm dispatch and are not flagged;
  * ``isinstance(x, C)`` where C (alone or in a tuple) is an algorithm spec class of core/spec.py:
    a class with a ``type: Literal[...]`` field, or a class of that module such a class derives
    from (``_PolicyGradient``).
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "learners", "actors", "rewards", "serve", "cluster", "protege")

# package -> the packages it may import (itself always). protege/ holds the entry points.
ALLOWED = {
    "core": set(),
    "learners": {"core"},
    "actors": {"core"},
    "rewards": {"core", "actors"},
    "serve": {"core", "actors"},
    "cluster": {"core", "learners", "actors", "rewards", "serve"},
    "protege": set(PACKAGES),
}

# library -> the only modules that may import it (paths from the repository root).
DOORS = {
    "deepspeed": {
        "learners/learner.py",  # the DeepSpeed engine of one learner rank
        "learners/weight_sender.py",  # gathers ZeRO-3 partitions to send them to the engines
    },
    "vllm": {
        "actors/engine.py",  # builds the vLLM engines (offline LLM, AsyncLLM)
        "actors/vllm_ext.py",  # the extension vLLM mixes into its workers (imports no vLLM today)
        "actors/weight_receiver.py",  # vLLM's weight-transfer engine, worker side
        "learners/weight_sender.py",  # vLLM's weight-transfer engine, trainer side (lazily)
        # serve/: vLLM's OpenAI serving layer and what wraps it
        "serve/app.py",
        "serve/generator.py",
        "serve/hf_client.py",
        "serve/layer.py",
        "serve/protocol.py",
    },
}
RAY_ACTOR_DOOR = {"cluster/launch.py"}  # "the only place plain classes become Ray actors"

# Light modules: besides the standard library they import only these (top-level names, or
# protege.<package> prefixes). What a REST front end or the CLI loads to validate a job.
LIGHT = {
    "core/spec.py": {"pydantic", "yaml", "protege.core"},
    "serve/api.py": {"pydantic", "protege.core", "protege.serve.protocol"},  # protocol: on first use
}

# Where the algorithms are declared and implemented: the seam itself.
SEAM = {"core/spec.py", "learners/algorithms.py"}
KNOWN_ALGORITHM_SPECS = {"GRPOSpec", "RLADSpec", "KEPOSpec", "OPDSpec", "DPOSpec", "SFTSpec", "_PolicyGradient"}
ALGO_NAME = re.compile(r"(^|_)(algorithm|algo)$")


# ----------------------------------------------------------------------------------- the source


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] != "protege":
        parts.insert(0, "protege")
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    """Module name (as installed: protege.core.spec) -> file."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


MODULES = _sources()
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def _rel(name: str) -> str:
    return MODULES[name].relative_to(ROOT).as_posix()


def _package(name: str) -> str:
    """protege.core.spec -> core; protege.cli -> protege."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PACKAGES and parts[1] != "protege" else "protege"


def _imports(name: str) -> list[tuple[int, str]]:
    """(line, imported name) for every import in the module, function-level ones too. For
    ``from M import n`` the name is ``M.n`` when that is a module of ours, else ``M``."""
    is_pkg = MODULES[name].name == "__init__.py"
    out = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in MODULES else base))
    return sorted(set(out))


def _own(target: str) -> str | None:
    """The module of ours an imported name lands in (longest known prefix), or None."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of ours: first line}. Package __init__ modules are edges only
    when imported by name (importing protege.core.spec runs protege/core/__init__.py too, but
    those are kept empty of imports by test_package_directions)."""
    g: dict[str, dict[str, int]] = {}
    for name in MODULES:
        edges: dict[str, int] = {}
        for line, target in _imports(name):
            own = _own(target)
            if own and own != name and own not in edges:
                edges[own] = line
        g[name] = edges
    return g


def _report(title: str, violations: list[str]) -> str:
    text = f"{title}: {len(violations)} violation(s)\n" + "\n".join(f"  {v}" for v in violations)
    print(text)
    return text


# ------------------------------------------------------------------------------------ the rules


def _cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one cycle."""
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(g):
        if v not in index:
            visit(v)

    cycles = []
    for comp in comps:  # one concrete cycle through the component's first module (BFS back to it)
        start, members = comp[0], set(comp)
        prev, frontier, found = {start: None}, [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(g[v]):
                    if w == start:
                        found = v
                        break
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        path, v = [], found
        while v is not None:
            path.append(v)
            v = prev[v]
        cycles.append(list(reversed(path)) + [start])
    return cycles


def test_no_import_cycles():
    g = _graph()
    violations = []
    for cycle in _cycles(g):
        steps = "; ".join(f"{_rel(a)}:{g[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:]))
        violations.append(f"cycle {' -> '.join(cycle)}  ({steps})")
    assert not violations, _report("import cycles", violations)


def test_package_directions():
    violations = []
    for name in MODULES:
        pkg = _package(name)
        for line, target in _imports(name):
            own = _own(target)
            if own is None:
                continue
            to = _package(own)
            if to != pkg and to not in ALLOWED[pkg]:
                violations.append(f"{_rel(name)}:{line}: {pkg} -> {to} (imports {target})")
    assert not violations, _report("forbidden package directions", violations)


def _stdlib(top: str) -> bool:
    return top in sys.stdlib_module_names or top == "__future__"


def test_heavy_import_doors():
    violations = []
    for name in MODULES:
        rel = _rel(name)
        for line, target in _imports(name):
            top = target.split(".")[0]
            if top in DOORS and rel not in DOORS[top]:
                violations.append(f"{rel}:{line}: imports {target} (only {', '.join(sorted(DOORS[top]))} may)")
            if rel in LIGHT and not _stdlib(top):
                if not any(target == ok or target.startswith(ok + ".") for ok in LIGHT[rel]):
                    violations.append(
                        f"{rel}:{line}: imports {target} (a light module: only the standard library"
                        f" and {', '.join(sorted(LIGHT[rel]))})"
                    )
        if rel not in RAY_ACTOR_DOOR:
            for node in ast.walk(TREES[name]):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr == "remote"
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "ray"
                ):
                    violations.append(
                        f"{rel}:{node.lineno}: ray.remote (actors are made only in {', '.join(sorted(RAY_ACTOR_DOOR))})"
                    )
    assert not violations, _report("heavy-import doors", violations)


def _algorithm_specs() -> set[str]:
    """Classes of core/spec.py with a ``type: Literal[...]`` field, and their bases in that module."""
    tree = TREES["protege.core.spec"]
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    specs = set()
    for c in classes.values():
        for stmt in c.body:
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and stmt.target.id == "type"
                and "Literal" in ast.unparse(stmt.annotation)
            ):
                specs.add(c.name)
    todo = list(specs)
    while todo:  # bases declared in core/spec.py, short of the common model base
        for b in classes[todo.pop()].bases:
            if isinstance(b, ast.Name) and b.id in classes and b.id != "_Strict" and b.id not in specs:
                specs.add(b.id)
                todo.append(b.id)
    return specs | KNOWN_ALGORITHM_SPECS


def _ends_in_algorithm(expr: ast.expr) -> bool:
    if isinstance(expr, ast.Name):
        return bool(ALGO_NAME.search(expr.id))
    if isinstance(expr, ast.Attribute):
        return bool(ALGO_NAME.search(expr.attr))
    return False


def _algo_type(expr: ast.expr) -> bool:
    return isinstance(expr, ast.Attribute) and expr.attr == "type" and _ends_in_algorithm(expr.value)


def _class_names(expr: ast.expr) -> list[str]:
    if isinstance(expr, ast.Tuple):
        return [n for e in expr.elts for n in _class_names(e)]
    if isinstance(expr, ast.Name):
        return [expr.id]
    if isinstance(expr, ast.Attribute):
        return [expr.attr]
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.BitOr):  # isinstance(x, A | B)
        return _class_names(expr.left) + _class_names(expr.right)
    return []


def test_algorithm_seams():
    specs = _algorithm_specs()
    violations = []
    for name in MODULES:
        rel = _rel(name)
        if rel in SEAM:
            continue
        for node in ast.walk(TREES[name]):
            if isinstance(node, ast.Compare) and any(_algo_type(e) for e in [node.left, *node.comparators]):
                violations.append(f"{rel}:{node.lineno}: dispatch on the algorithm's type: {ast.unparse(node)}")
            elif isinstance(node, ast.Match) and _algo_type(node.subject):
                violations.append(f"{rel}:{node.lineno}: match on the algorithm's type: {ast.unparse(node.subject)}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "isinstance"
                and len(node.args) == 2
                and set(_class_names(node.args[1])) & specs
            ):
                violations.append(f"{rel}:{node.lineno}: isinstance on an algorithm spec: {ast.unparse(node)}")
    violations.sort(key=lambda v: (v.split(":")[0], int(v.split(":")[1])))
    assert not violations, _report("algorithm seams", violations)


def test_the_rules_see_the_code():
    """The scan itself: every package has modules, the spec's algorithms are found, and the
    function-level imports count (learners/learner.py imports DeepSpeed inside a method)."""
    assert {_package(n) for n in MODULES} == set(PACKAGES)
    assert {"GRPOSpec", "SFTSpec", "_PolicyGradient"} <= _algorithm_specs()
    assert any(t.startswith("deepspeed") for _, t in _imports("protege.learners.learner"))
    edges = defaultdict(set)
    for a, bs in _graph().items():
        edges[_package(a)] |= {_package(b) for b in bs}
    assert "core" in edges["learners"]

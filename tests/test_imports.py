"""The import rules of docs/architecture.md, checked by reading the sources (nothing is imported).

Every `import` of an sft or launch module counts, also one inside a function (a lazy import is still a
dependency); only imports under `if TYPE_CHECKING:` are left out (annotations, never run). Two rules:
a module imports nothing its area forbids (RULES), and no modules import each other in a circle.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sft", "launch")

# area (a module or package) -> areas it must not import. The longest matching area applies; a module may
# always import inside its own area. docs/architecture.md says why each rule is there.
LEAF = ("sft", "launch")
DRIVERS = ("launch", "sft.train", "sft.cli")  # what starts and runs a job: nothing below imports them
STAGES = ("sft.data", "sft.model", "sft.strategies", "sft.merge", "sft.export", "sft.checkpoint")


def stages_but(*allowed: str) -> tuple[str, ...]:
    """Every stage of the flow except the neighbours a module may use."""
    return tuple(s for s in STAGES if s not in allowed)


RULES: dict[str, tuple[str, ...]] = {
    # the leaves: anyone may use them, they use nothing of sft
    "sft.errors": LEAF,
    "sft.paths": LEAF,
    "sft.publish": LEAF,
    "sft.dist": LEAF,
    "sft.signals": LEAF,
    "sft.optim_state": LEAF,
    "sft.gpus": LEAF,
    "sft.memory": LEAF,
    "sft.rank_failure": LEAF,
    # safetensors files read and written one tensor at a time (merge, sharded loading, export): errors only
    "sft.safetensors_io": ("sft.config", "sft.ds_config", "sft.dist", *STAGES, *DRIVERS),
    # the recipe: validated before anything heavy exists
    "sft.config": (*STAGES, "sft.dist", *DRIVERS),
    "sft.ds_config": (*STAGES, "sft.dist", *DRIVERS),
    # the stages of the flow: each knows the recipe and the leaves, and only the neighbours named here
    "sft.builtin_data": ("sft.config", *STAGES, *DRIVERS),
    "sft.data": (*STAGES, "sft.loss", *DRIVERS),
    "sft.model": (*STAGES, *DRIVERS),
    "sft.strategies": (*stages_but("sft.model", "sft.export"), *DRIVERS),
    "sft.export": (*stages_but("sft.model"), *DRIVERS),
    "sft.checkpoint": (*STAGES, *DRIVERS),
    "sft.merge": (*stages_but("sft.model", "sft.export"), "sft.dist", *DRIVERS),
    "sft.loss": (*stages_but("sft.data"), *DRIVERS),
    "sft.evaluate": (*stages_but("sft.data"), *DRIVERS),
    "sft.optim": (*STAGES, *DRIVERS),
    "sft.metrics": (*STAGES, *DRIVERS),
    # observability and planning: they read the recipe, batches and models, never drive them
    "sft.throughput": (*stages_but("sft.data", "sft.model"), *DRIVERS),
    "sft.manifest": (*stages_but("sft.data"), *DRIVERS),
    "sft.plan": (*stages_but("sft.model"), *DRIVERS),
    "sft.simulate": (*stages_but("sft.model"), *DRIVERS),
    "sft.plots": (*STAGES, *DRIVERS),
    "sft.report": (*STAGES, *DRIVERS),
    # the user's work: checked before anything loads, continued or refused on resume, stopped on divergence
    "sft.run_folder": (*STAGES, "sft.dist", *DRIVERS),
    "sft.preflight": (*stages_but("sft.data", "sft.model"), *DRIVERS),
    "sft.resume": (*stages_but("sft.checkpoint"), *DRIVERS),
    "sft.divergence": (*stages_but("sft.checkpoint"), *DRIVERS),
    "launch": (*STAGES, "sft.train", "sft.cli"),
    # commands: the loop may use every stage, `sft eval` the stages it scores with; only the CLI imports them
    "sft.train": ("sft.merge", "launch", "sft.cli"),
    "sft.model_eval": ("sft.strategies", *DRIVERS),
    "sft.cli": (),  # the command line dispatches to every command (lazily)
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported(path: Path, known: set[str]) -> set[str]:
    """The sft/launch modules a file imports at run time: the longest known module each import names, and
    the packages above it that are not also above the importer (their __init__ runs too)."""
    this = module_name(path)
    out: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        while name and not (this == name or this.startswith(name + ".")):
            out.add(name)
            name = name.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importer's package upwards
                package = this if path.name == "__init__.py" else this.rpartition(".")[0]
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            add(base)
            for alias in node.names:
                add(f"{base}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return out


@functools.cache
def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    return {name: imported(path, set(files)) for name, path in files.items()}


def area_rule(module: str) -> tuple[str, tuple[str, ...]] | None:
    areas = [a for a in RULES if module == a or module.startswith(a + ".")]
    return (max(areas, key=len), RULES[max(areas, key=len)]) if areas else None


def inside(module: str, area: str) -> bool:
    return module == area or module.startswith(area + ".")


def test_every_module_has_a_rule() -> None:
    """A new module joins an area (or gets a rule of its own, and a paragraph in docs/architecture.md)."""
    lawless = sorted(m for m in graph() if m not in PACKAGES and area_rule(m) is None)
    assert not lawless, f"no import rule for {', '.join(lawless)}: add one to RULES"


def test_no_module_imports_what_its_area_forbids() -> None:
    broken = []
    for module, targets in sorted(graph().items()):
        rule = area_rule(module)
        if rule is None:
            continue
        area, forbidden = rule
        for target in sorted(targets):
            if inside(target, area):
                continue  # within its own area
            if any(inside(target, f) for f in forbidden):
                rule_text = ", ".join(f for f in forbidden if f != area)
                broken.append(f"{module} imports {target} ({area} must not import {rule_text})")
    assert not broken, "\n".join(broken)


def test_no_import_circles() -> None:
    edges = graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                circles.append([*path[path.index(n) :], n])
            elif n not in state:
                walk(n)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            walk(m)
    assert not circles, "\n".join(" -> ".join(c) for c in circles)

"""The architecture's one-way layers, checked on the source: `cli` -> `tasks`/`bench`/`viz` -> `nn` ->
`functional` (+ `flex`) -> `kernels` -> the shared vocabulary (`masks`, `scores`, `softmax`), with the leaf
helpers (`_checks`, `_io`) below everything. No exception: no import runs back up.

Every `import` in the package is read from the syntax tree, lazy ones inside functions included, so a shortcut
taken today shows up here instead of as an import cycle later."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "attnkit"

# rank of each top-level part of the package: a module may import its own rank or lower
RANK = {"_argtypes": 0, "_checks": 0, "_io": 0, "_progress": 0, "masks": 1, "scores": 1, "softmax": 1, "kernels": 2,
        "functional": 3, "flex": 3, "nn": 4, "distributed": 4, "tasks": 5, "bench": 5, "viz": 5,
        "integrations": 5, "cli": 6, "__main__": 7}

# the shared vocabulary every layer speaks (masks, score functions, normalizers): the lowest layer above the
# helpers, importing nothing from attnkit but `_checks` and itself (checked below).
VOCABULARY = {"attnkit.masks", "attnkit.scores", "attnkit.softmax"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.parent / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Every attnkit module ``path`` imports: ``from attnkit.functional import scores`` counts as
    ``attnkit.functional.scores``, ``from attnkit.functional import attention`` (a function) as
    ``attnkit.functional``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "attnkit")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "attnkit":
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if _is_module(sub) else node.module)
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


SOURCES = sorted(p for p in ROOT.rglob("*.py"))


def test_every_part_of_the_package_has_a_rank():
    parts = {_part(_module_name(p)) for p in SOURCES} - {""}
    assert parts <= set(RANK), f"give these a layer in RANK: {sorted(parts - set(RANK))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    me = _module_name(path)
    mine = RANK.get(_part(me), 99)
    bad = []
    for target in sorted(_imports(path)):
        part = _part(target)
        if part == "" or part not in RANK:  # `import attnkit` (the light package) or a name re-exported by it
            continue
        if RANK[part] <= mine:
            continue
        bad.append(target)
    assert not bad, f"{me} (layer {_part(me)!r}) imports the higher layer(s) {bad}"


@pytest.mark.parametrize("module", sorted(VOCABULARY))
def test_the_shared_vocabulary_is_a_leaf(module):
    base = ROOT.parent / Path(*module.split("."))
    paths = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
    for path in paths:
        other = {m for m in _imports(path) if not m.startswith(module)}
        assert other <= {"attnkit._checks"}, f"{path.name} of {module} must import nothing from attnkit but _checks"

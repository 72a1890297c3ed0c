"""The layers of docs/ARCHITECTURE.md, checked on the code: no import runs back up a layer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "privseg"

# Each layer is a set of folders; lower numbers are lower layers. A module may import its own
# folder, the layers below, and (except in layer 1, whose parts are independent of each other)
# the other folders of its layer.
LAYERS = {
    "core": 0,
    "config": 0,
    "data": 1,
    "models": 1,
    "evaluation": 1,
    "privacy": 1,
    "report": 1,
    "training": 2,
    "attack": 2,
    "inference": 2,
    "federated": 3,
    "runs": 4,
    "cli": 5,
}
PEERS_APART = {1}  # layers whose folders never import each other
MAX_LINES = 400


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "privseg" or len(parts) < 2:
        return None
    return parts[1]


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def _owner(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def test_every_module_lies_in_a_layer_folder() -> None:
    """No module loose at the package root: its folder says its layer."""
    loose = sorted(p.name for p in SRC.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert not loose, f"modules at the package root (put each in its layer's folder): {loose}"
    owners = {_owner(p) for p in SRC.rglob("*.py")} - {"__init__", "__main__"}
    assert owners <= set(LAYERS), f"add a layer for {sorted(owners - set(LAYERS))}"


def test_the_parts_of_layer_1_do_not_import_each_other() -> None:
    """data, models, evaluation, privacy and report each stand on layer 0 alone."""
    crossing = []
    for path in sorted(SRC.rglob("*.py")):
        owner = _owner(path)
        if LAYERS.get(owner) not in PEERS_APART:
            continue
        for line, module in _imports(path):
            target = _part(module)
            if target != owner and target in LAYERS and LAYERS[target] == LAYERS[owner]:
                crossing.append(f"{path.relative_to(SRC)}:{line} imports {module}")
    assert not crossing, "layer-1 parts importing each other:\n" + "\n".join(crossing)


def test_no_import_runs_back_up_a_layer() -> None:
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        owner = _owner(path)
        if owner in ("__init__", "__main__"):
            continue
        for line, module in _imports(path):
            target = _part(module)
            if target in LAYERS and LAYERS[target] > LAYERS[owner]:
                upward.append(f"{path.relative_to(SRC)}:{line} imports {module}")
    assert not upward, "imports that run back up a layer:\n" + "\n".join(upward)


def test_no_module_is_over_the_size_limit() -> None:
    big = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines: {big}"


FILE_NAME = re.compile(r"^[\w.-]+\.(json|pt|toml|png|svg|csv|md|html|sqlite|log|npy)$")
FLOWER_NAMES = {"pyproject.toml", "config.toml"}  # Flower's files (the App, $FLWR_HOME), not ours


def test_each_file_name_is_spelled_in_one_module() -> None:
    """``"attack.json"``-style names live in their one place (RunFolder, the cache, ...)."""
    where: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.value if isinstance(node, ast.Constant) else None
            if isinstance(name, str) and FILE_NAME.match(name) and name not in FLOWER_NAMES:
                where.setdefault(name, set()).add(str(path.relative_to(SRC)))
    spread = {name: sorted(mods) for name, mods in where.items() if len(mods) > 1}
    assert not spread, f"file names spelled in several modules: {spread}"
    assert where["attack.json"] == where["audit.json"] == {"core/run_folder.py"}
    assert where["manifest.json"] == {"data/cache.py"}

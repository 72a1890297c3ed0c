"""The layers of docs/ARCHITECTURE.md, checked on the code: no import runs back up a layer."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "privseg"

# Lower numbers are lower layers; a module may import its own layer or any layer below.
LAYERS = {
    "errors": 0,
    "io": 0,
    "output": 0,
    "progress": 0,
    "choices": 0,
    "logs": 0,
    "typed_config": 0,
    "config": 0,
    "results": 0,
    "study_result": 0,
    "fields": 0,
    "device": 0,
    "registry": 0,
    "plugins": 0,
    "data": 1,
    "models": 1,
    "evaluation": 1,
    "privacy": 1,
    "report": 1,
    "run_folder": 2,
    "training": 2,
    "attack": 2,
    "inference": 2,
    "federated": 3,
    "runs": 4,
    "cli": 5,
}
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


def test_every_module_has_a_layer() -> None:
    owners = {_owner(p) for p in SRC.rglob("*.py")} - {"__init__"}
    assert owners <= set(LAYERS), f"add a layer for {sorted(owners - set(LAYERS))}"


def test_no_import_runs_back_up_a_layer() -> None:
    upward = []
    for path in sorted(SRC.rglob("*.py")):
        owner = _owner(path)
        if owner == "__init__":
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
    assert where["attack.json"] == where["audit.json"] == {"run_folder.py"}
    assert where["manifest.json"] == {"data/cache.py"}

"""The README stays short and its promises hold: two Quick start commands that CI runs, a CLI table
that matches the real CLI, and no relative link in README.md or docs/*.md to a file or heading
that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 250
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def section(text: str, heading: str) -> str:
    """The body of the `## heading` section (up to the next `## `)."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_the_readme_is_short() -> None:
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES})"


def test_the_quick_start_is_two_commands_that_ci_runs() -> None:
    body = section(README.read_text(), "Quick start")
    blocks = re.findall(r"```bash\n(.*?)```", body, re.S)
    assert len(blocks) == 1, "the Quick start has one command block"
    commands = [
        line.split("#")[0].strip()
        for line in blocks[0].splitlines()
        if line.split("#")[0].strip()
    ]  # fmt: skip
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no '{target}' target"
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(), re.M)


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(doc: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT)}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


def test_the_readme_links_every_doc() -> None:
    text = README.read_text()
    missing = [d.name for d in DOCS if f"(docs/{d.name}" not in text]
    assert not missing, f"README links no {missing}"


def _root() -> click.Group:
    from privseg.cli.app import app

    root = typer.main.get_command(app)
    assert isinstance(root, click.Group)
    return root


def _commands() -> dict[str, click.Command]:
    root = _root()
    found: dict[str, click.Command] = {}
    for name, cmd in root.commands.items():
        if isinstance(cmd, click.Group):
            found.update({f"{name} {sub}": c for sub, c in cmd.commands.items()})
        else:
            found[name] = cmd
    return found


def test_the_cli_table_matches_the_cli() -> None:
    """Every command is in the README's table, and every option the table shows exists."""
    body = section(README.read_text(), "CLI reference")
    commands = _commands()
    listed: set[str] = set()
    problems = []
    for row in re.findall(r"^\| `privseg ([^`]+)` \|", body, re.M):
        name = next((n for n in commands if row.startswith(f"{n} ") or row == n), None)
        if name is None and not row.startswith("["):  # "[-v] COMMAND ...": the root's options
            problems.append(f"no command for row {row!r}")
            continue
        listed.add(name or "")
        command = commands[name] if name else _root()
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for option in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", row):
            if option not in known:
                problems.append(f"privseg {name} has no {option}")
    problems += [f"privseg {n} is not in the table" for n in sorted(set(commands) - listed)]
    assert not problems, problems

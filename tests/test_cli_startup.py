"""The real `privseg` process: a bad config is refused before torch or Flower load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = {"torch", "flwr", "ray", "opacus", "numpy"}
"""Packages that take seconds to import: none of them may load to refuse a config."""


def privseg(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter that reports every import (``-X importtime``)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-c",
            "from privseg.cli.app import main; main()",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def imported(stderr: str) -> set[str]:
    """Top-level packages named by ``-X importtime`` lines."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def messages(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))


BAD_LR = ("train.lr = -1", "is invalid", "> 0.0")  # the field, the value and the rule


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", "-d", "{tmp}", "-o", "{tmp}/r", "-s", "bogus=1"], ("bogus", "not a config")),
        (["train", "-d", "{tmp}", "-o", "{tmp}/r", "-s", "train.lr=-1"], BAD_LR),
        (["run", "-d", "{tmp}", "-o", "{tmp}/s", "-s", "train.lr=-1"], BAD_LR),
        (["server", "-o", "{tmp}/r", "--insecure", "-s", "train.lr=-1"], BAD_LR),
        (["attack", "{tmp}", "--site", "a", "-s", "attack.iterations=0"], (">= 1",)),
        (["data", "prepare", "{tmp}", "--out", "{tmp}/c", "-s", "data.sites=0"], (">= 1",)),
        (["pretrain", "-o", "{tmp}/p", "-s", "train.lr=-1"], BAD_LR),
        (
            ["site", "-d", "{tmp}", "--site", "a", "--server", "x:1", "-c", "{tmp}/bad.toml"],
            ("privacy.delta = 2", "< 1.0"),
        ),
    ],
)
def test_a_bad_config_exits_2_before_torch_loads(tmp_path, argv, expected):
    (tmp_path / "bad.toml").write_text("[privacy]\ndelta = 2\n")
    done = privseg(*(a.format(tmp=tmp_path) for a in argv))
    text = messages(done.stderr)
    assert done.returncode == 2, text
    assert all(part in text for part in expected) and "Traceback" not in text, text
    assert not imported(done.stderr) & HEAVY, sorted(imported(done.stderr) & HEAVY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]  # nothing written

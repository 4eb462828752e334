"""The README's commands work exactly as written, and CI runs the README's own commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from ray_app.config import FilterConfig

README = (ROOT / "README.md").read_text()


def readme_command(name: str) -> str:
    match = re.search(rf"<!-- command: {name} -->\s*```bash\n(.+?)\n```", README, re.S)
    assert match, f"README has no `<!-- command: {name} -->` block"
    return match.group(1).strip()


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A working folder that looks like the repository root to the README's commands: the
    examples, and `.venv` pointing at the environment running the tests."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / ".venv").symlink_to(sys.prefix)  # the virtual environment running the tests
    return tmp_path


def run(command: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "RESTAGE_CACHE": os.environ["RESTAGE_CACHE"]}
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_ci_runs_the_readme_setup_and_test_commands():
    script = ROOT / ".ci" / "run"
    body = script.read_text()
    extract = body[body.index("readme_command() {") : body.index("\nsetup=")]
    for name in ("setup", "test"):
        got = subprocess.run(
            ["bash", "-c", f"{extract}\nreadme_command {name}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert got == readme_command(name)
    assert os.access(script, os.X_OK)


def test_quickstart(user_dir):
    command = readme_command("quickstart")
    proc = run(command, user_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = re.search(r"--out (\S+)", command).group(1)
    summary = json.loads((user_dir / out / "summary.json").read_text())
    assert summary["products"]["ok"] + summary["products"]["partial"] == 3
    assert "stage" in proc.stdout and "outputs:" in proc.stdout  # the summary table


def test_config_error_example(user_dir):
    proc = run(readme_command("config-error"), user_dir)
    assert proc.returncode == 2
    assert "generator.batch_size=-1: Input should be greater than 0" in proc.stderr


def test_make_tiny_example(user_dir):
    proc = run(readme_command("make-tiny"), user_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = user_dir / readme_command("make-tiny").split()[-1]
    assert len(list(folder.iterdir())) == 9


def test_every_threshold_is_documented():
    for name in FilterConfig.model_fields:
        assert f"`{name}`" in README, f"augment.filter.{name} is not documented in the README"

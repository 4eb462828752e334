"""The `restage` console script, run as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_app.cli import EXIT_BROKEN_PIPE, EXIT_USAGE, build_parser

RESTAGE = str(Path(sys.executable).with_name("restage"))


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([RESTAGE, *args], capture_output=True, text=True, timeout=300, **kwargs)


def _subcommands() -> list[list[str]]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    out = []
    for name, sub in action.choices.items():
        nested = [
            a for a in sub._actions if getattr(a, "choices", None) and a.dest.endswith("_command")
        ]
        out += [[name, child] for child in nested[0].choices] if nested else [[name]]
    return out


@pytest.mark.parametrize("command", _subcommands(), ids=" ".join)
def test_every_subcommand_explains_itself(command):
    proc = run(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: restage" in proc.stdout and len(proc.stdout) > 200


def test_config_show_tiny_prints_the_resolved_config():
    proc = run("config", "show", "--profile", "tiny")
    assert proc.returncode == 0, proc.stderr
    shown = yaml.safe_load(proc.stdout)
    assert shown["profile"] == "tiny" and shown["generator"]["source"] == "tiny"
    assert shown["ray"]["num_cpus"] == 4


def test_config_show_rejects_bad_value_naming_the_key():
    proc = run("config", "show", "--set", "generator.batch_size=-1")
    assert proc.returncode == 2
    assert "generator.batch_size=-1" in proc.stderr and "greater than 0" in proc.stderr
    assert proc.stdout == ""


def test_models_list_names_every_role():
    proc = run("models", "list", "--profile", "default")
    assert proc.returncode == 0, proc.stderr
    for role in (
        "captioner",
        "segmenter",
        "novel_view",
        "inpainter",
        "generator",
        "clip",
        "dino",
        "encoder",
        "llm",
    ):
        assert role in proc.stdout
    assert "stabilityai/stable-diffusion-xl-base-1.0" in proc.stdout


def test_make_tiny_rejects_unknown_role(tmp_path):
    proc = run("models", "make-tiny", str(tmp_path), "--roles", "generator,flux")
    assert proc.returncode == 2 and "unknown role(s) flux" in proc.stderr


def test_make_tiny_subset(tmp_path):
    env = {**os.environ, "RESTAGE_CACHE": str(tmp_path / "cache")}
    proc = run("models", "make-tiny", str(tmp_path / "t"), "--roles", "dino,clip", env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["clip", "dino"]


def test_output_into_a_closed_pipe_is_not_a_traceback():
    """`restage prompts show | head`: the reader goes away before restage has written all."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write: deterministic
    try:
        proc = subprocess.run(
            [RESTAGE, "prompts", "show", "--type", "mug"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == EXIT_BROKEN_PIPE, proc.stderr
    assert proc.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored"


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["config", "show", "--set", "serve.port=0"], {}, "serve.port=0"),
        (
            ["augment", "--profile", "tiny", "--manifest", "/nonexistent.jsonl", "--out", "o"],
            {},
            "does not exist",
        ),
        (
            ["serve", "--profile", "tiny", "--adapters", "a"],
            {"RESTAGE_API_KEYS": "short"},
            "shorter than 16",
        ),
        (["models", "make-tiny", "d", "--roles", "flux"], {}, "unknown role(s) flux"),
        (["augment", "--manifest"], {}, "expected one argument"),  # argparse's own
    ],
    ids=["config", "missing-input", "short-key", "bad-role", "argparse"],
)
def test_every_usage_error_exits_2_naming_the_problem(args, env, needle, tmp_path):
    """(A missing API key: test_serve.py::test_serve_refuses_to_start_without_keys.)"""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RESTAGE_API_KEYS")}
    proc = run(*args, env={**base, **env}, cwd=tmp_path)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_serve_help_shows_the_values_in_force():
    from ray_app.config import ServeConfig

    serve = (
        next(a for a in build_parser()._actions if a.dest == "command")
        .choices["serve"]
        .format_help()
    )
    defaults = ServeConfig()
    assert f"serve.host, {defaults.host}" in serve and f"serve.port, {defaults.port}" in serve
    assert "[serve.host]" not in serve and "[serve.port]" not in serve


@pytest.mark.parametrize(
    ("argv", "target", "args_type", "expected"),
    [
        (
            ["augment", "--manifest", "m.jsonl", "--out", "o"],
            "pipelines.augment",
            "AugmentArgs",
            {"manifest": "m.jsonl", "out": "o"},
        ),
        (
            ["train", "--data", "d", "--out", "o"],
            "pipelines.train",
            "TrainArgs",
            {"data": "d", "out": "o", "manifest": None},
        ),
        (
            ["generate", "--adapters", "a", "--out", "o", "--top-n", "2", "--user-prompts", "u"],
            "pipelines.generate",
            "GenerateArgs",
            {"adapters": "a", "out": "o", "prompts": None, "top_n": 2, "user_prompts": "u"},
        ),
        (
            ["run", "--manifest", "m", "--out", "o"],
            "pipelines.run",
            "RunArgs",
            {"manifest": "m", "out": "o"},
        ),
        (
            ["prompts", "build", "--out", "b.yaml", "--types", "mug,lamp"],
            "pipelines.prompts",
            "BuildArgs",
            {"out": "b.yaml", "per_type": 30, "types": "mug,lamp", "bank": None},
        ),
        (
            ["serve", "--adapters", "a", "--port", "9000", "--no-auth"],
            "serve.app",
            "ServeArgs",
            {"adapters": "a", "host": None, "port": 9000, "no_auth": True},
        ),
    ],
)
def test_each_entry_gets_typed_arguments_from_its_flags(
    monkeypatch, argv, target, args_type, expected
):
    """The parsed flags become the job's own typed arguments at the CLI: a flag renamed
    without its field (or the reverse) fails here, not in a job."""
    import dataclasses
    import importlib

    from ray_app import cli
    from ray_app.config import load_config

    module = importlib.import_module(target)
    seen = []
    monkeypatch.setattr(module, "main", lambda config, args: seen.append(args))
    cli._entry(
        f"{target}:main", args_type, load_config("tiny"), cli.build_parser().parse_args(argv)
    )
    (args,) = seen
    assert type(args) is getattr(module, args_type) and dataclasses.is_dataclass(args)
    assert {k: getattr(args, k) for k in expected} == expected

"""The suite on parallel workers (the README's `-n 2`): pytest-xdist hands out conftest's
groups whole, so the groups decide which fixtures start once."""

from __future__ import annotations

import itertools
import os
import tomllib

from conftest import (
    QUICKSTART_MODULES,
    ROOT,
    module_of,
    pytest_xdist_make_scheduler,
    readme_command,
    uses_ray_local,
    worker_group,
)


def test_the_readme_test_command_runs_on_workers_in_conftests_order():
    assert " -n 2" in readme_command("test")  # the unit tests alone keep 2 cores busy anyway
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    # xdist's own reorder would hand out groups by their number of tests, not the longest first.
    assert "--no-loadscope-reorder" in ini["addopts"]


def test_a_group_is_a_module_or_the_quickstart_users_together(request):
    group = worker_group
    assert group("tests/test_train.py::test_a") == group("tests/test_train.py::test_b[1]")
    assert group("tests/test_train.py::test_a") != group("tests/test_generate.py::test_a")
    assert len({group(f"{m}::test_x") for m in QUICKSTART_MODULES}) == 1
    request.config.option.dist, dist = "each", request.config.option.dist
    try:  # a mode asked for by name is xdist's own
        assert pytest_xdist_make_scheduler(request.config, None) is None
    finally:
        request.config.option.dist = dist


def test_every_module_that_uses_the_quickstart_is_in_its_group(request):
    """A module left out would run the quick start again on the other worker. (Under `-m "not
    slow"` no test that uses it is collected.)"""
    users = {module_of(item) for item in request.session.items if "quickstart" in item.fixturenames}
    assert users <= QUICKSTART_MODULES
    assert all((ROOT / m).is_file() for m in QUICKSTART_MODULES)


def test_on_a_worker_each_group_is_whole_those_on_ray_local_first_then_the_most_end_to_end(
    request,
):
    """The groups that use ``ray_local`` come first (one after another they share its Ray),
    each part with the groups of the most end-to-end tests first."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a single process keeps the files' order
    items = request.session.items
    runs = [g for g, _ in itertools.groupby(worker_group(item.nodeid) for item in items)]
    assert len(runs) == len(set(runs)), "a group is split in the worker's order"
    on_ray = {worker_group(i.nodeid) for i in items if uses_ray_local(i)}
    parts = [[g for g in runs if g in on_ray], [g for g in runs if g not in on_ray]]
    assert runs == parts[0] + parts[1]
    for part in parts:
        slow = [
            sum("slow" in i.keywords for i in items if worker_group(i.nodeid) == g) for g in part
        ]
        assert slow == sorted(slow, reverse=True)

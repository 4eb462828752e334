"""The README's commands work exactly as written, and CI runs the README's own commands."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, readme_command
from output import last_line

from ray_app.adapter_meta import AdapterMeta
from ray_app.config import ROLES, FilterConfig, load_config
from ray_app.storage import AdapterLayout, RunLayout
from ray_app.tiny import TINY_VAE

README = (ROOT / "README.md").read_text()
MAX_QUICKSTART_LINES = 60  # the whole output of the quick start when it is not a terminal
# What a job must not print (issue 17's list, and what came up since).
NOISE = (
    "logging_progress",  # Ray Data's progress blocks, reprinted every few seconds off a terminal
    "RAW:",  # absl's mutex.cc 'Lock blocking' lines
    "core_worker.cc",  # Ray's C++ core (the harmless ones are dropped: ray_app.native_stderr)
    "is deprecated",  # API drift in our calls (Ray Data's warnings are log lines, not warnings)
    "Token authentication is enabled",  # a new local Ray's default, said at every start
    "Cannot deregister autoscaling state",  # Serve's
    "New http_options",  # Serve's, misleading: ours were applied
)


def run(command: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(n in line for n in NOISE)]


def run_on_a_terminal(command: str, cwd: Path, timeout: float = 900) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal as its stdout and stderr -> its exit status and
    everything it showed. The terminal has 120 columns, as a real one has a size: at 0
    columns Ray Data's bars (tqdm) draw nothing."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        ["bash", "-c", command],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,
    )
    os.close(terminal)
    shown = bytearray()
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], 5)
            if not ready:
                if proc.poll() is not None:  # ended; a leftover child may hold the terminal
                    break
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer is gone
                break
            if not chunk:
                break
            shown += chunk
        status = proc.wait(timeout=timeout)
    finally:
        os.close(controller)
    return status, shown.decode(errors="replace")


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


@pytest.mark.slow
def test_quickstart(quickstart):
    proc, out = quickstart
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage" in proc.stdout and "outputs:" in proc.stdout  # the summary table
    layouts = RunLayout(str(out))
    for job, layout in (
        ("augment", layouts.augment),
        ("train", layouts.adapters),
        ("generate", layouts.generations),
    ):
        summary = json.loads(Path(layout.summary()).read_text())
        assert summary["products"].get("ok", 0) + summary["products"].get("partial", 0) == 3, (
            job,
            summary,
        )
    run_summary = json.loads(Path(out, "summary.json").read_text())
    assert run_summary["job"] == "run"
    products = run_summary["products"]  # augment's partial products are not in "ok"
    assert products["train ok"] == products["generate ok"] == 3, products
    assert [products[f"{job} failed"] for job in ("augment", "train", "generate")] == [0, 0, 0]
    ids = layouts.augment.completed()
    assert len(ids) == 3 and layouts.adapters.completed() == layouts.generations.completed() == ids
    top_n = load_config("tiny").generate.top_n
    for pid in ids:
        meta = AdapterMeta.read(layouts.adapters.metadata(pid))
        assert meta.training_set.uri == layouts.augment.root
        rows = pq.read_table(layouts.generations.manifest_shard(pid)).to_pylist()
        assert sum(r["kept"] for r in rows) == top_n
    assert len(list((out / "adapters").glob(f"*/{AdapterLayout.WEIGHTS}"))) == 3
    assert len(list((out / "generations" / "images").glob("*/*.png"))) >= 3
    assert (out / "_ray_logs").is_symlink() and (out / "_ray_logs").is_dir()
    said = [line for line in proc.stderr.splitlines() if line.startswith("Ray's logs: ")]
    assert said and Path(said[-1].split(": ", 1)[1]).samefile(out / "_ray_logs")
    assert not (out / "adapters" / "_ray_train").exists()  # no empty leftovers


@pytest.mark.slow
def test_quickstart_output_off_a_terminal_is_short(quickstart):
    """The fixture runs the quick start with its output captured (not a terminal): one
    compact line per stage and the summary, not Ray Data's progress blocks or Ray's logs."""
    proc, _ = quickstart
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= MAX_QUICKSTART_LINES, "\n".join(lines)
    assert not noise(proc.stdout + proc.stderr)
    for job in ("augment", "train", "generate"):
        assert f"restage {job}: done: 3/3 products" in proc.stderr, job
    assert "\x1b[A" not in proc.stderr  # nothing redrawn in place


@pytest.mark.slow
def test_a_job_on_a_terminal_shows_a_live_display(quickstart, user_dir, tmp_path):
    """On a terminal a job draws Ray Data's progress bars, redrawn in place, instead of the
    compact lines that the quick start (not a terminal) printed. generate, the chain's
    shortest job, again on the quick start's adapters."""
    proc, out = quickstart
    assert proc.returncode == 0, proc.stderr[-3000:]
    restage = readme_command("quickstart").split()[0]
    status, shown = run_on_a_terminal(
        f"{restage} generate --profile tiny --adapters {out / 'adapters'} --out {tmp_path}",
        user_dir,
    )
    assert status == 0, shown[-3000:]
    assert "Running Dataset" in shown and "\x1b[A" in shown  # bars, cursor up to redraw
    assert "restage generate: 3 products to do" not in shown  # the lines are for logs
    assert "restage generate: done: 3 products" in shown  # the summary's last line
    assert not noise(shown)
    assert "restage generate: 3 products to do" in proc.stderr
    assert "Running Dataset" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_status_example_shows_the_quickstart_jobs_finished(quickstart, user_dir):
    proc = run(readme_command("status"), user_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"augment", "train", "generate"}, proc.stdout
    for job, line in rows.items():  # 3/3, or 0/0 once a re-run found them all complete
        assert " finished " in line, (job, proc.stdout)
        assert " 3/3 " in line or (" 0/0 " in line and "already complete 3" in line), line


@pytest.mark.slow
def test_quickstart_rerun_resumes(quickstart, user_dir):
    proc = run(readme_command("quickstart"), user_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layouts = RunLayout(str(quickstart[1]))
    for job, layout in (
        ("augment", layouts.augment),
        ("train", layouts.adapters),
        ("generate", layouts.generations),
    ):
        summary = json.loads(Path(layout.summary()).read_text())
        assert summary["products"]["already complete"] == 3, (job, summary["products"])
        # Nothing redone (augment's "products" cover the whole job, its "this_run" this run).
        this_run = summary.get("this_run", summary["products"])
        assert this_run.get("ok", 0) == 0, (job, this_run)
        # The run's own summary says the same of each job (not augment's whole-job count).
        products = json.loads((quickstart[1] / "summary.json").read_text())["products"]
        assert products[f"{job} ok"] == 0 and products[f"{job} already complete"] == 3, products


def test_config_error_example(user_dir):
    proc = run(readme_command("config-error"), user_dir)
    assert proc.returncode == 2
    assert "generator.batch_size=-1: Input should be greater than 0" in proc.stderr


@pytest.mark.slow  # builds every role's checkpoint; test_cli's make-tiny tests build two
def test_make_tiny_example(user_dir):
    proc = run(readme_command("make-tiny"), user_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = user_dir / readme_command("make-tiny").split()[-1]
    # One folder per role, and the separate VAE of the generator and inpainter.
    assert {p.name for p in folder.iterdir()} == {*ROLES, TINY_VAE}


def test_every_threshold_is_documented():
    for name in FilterConfig.model_fields:
        assert f"`{name}`" in README, f"augment.filter.{name} is not documented in the README"


def test_deprecations_in_our_code_fail_the_tests():
    """pyproject's warnings policy: API drift in our own modules is an error in tests; a
    library's deprecation about its own internals stays visible, not fatal."""
    import warnings

    for module in ("ray_app.models", "actors.generator", "pipelines.train", "serve.ingress"):
        for category in (DeprecationWarning, FutureWarning):
            with pytest.raises(category):
                warnings.warn_explicit("old API", category, f"{module}.py", 1, module=module)
    with warnings.catch_warnings(record=True) as shown:
        warnings.warn_explicit("old API", DeprecationWarning, "lib.py", 1, module="somelib.x")
    assert len(shown) == 1


@pytest.mark.slow  # evaluates the quick start's run
def test_evaluate_example_scores_the_quickstart_run(quickstart, user_dir):
    proc = run(readme_command("evaluate"), user_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = user_dir / readme_command("evaluate").split()[-1]
    tables = json.loads((out / "summary.json").read_text())
    assert tables["run_order"] == ["quickstart"] and tables["products"] == 3
    assert tables["images"]["quickstart"] > 0 and tables["errors"]["quickstart"] == 0
    assert tables["overall"]["quickstart"]["dino"]["n"] == 3
    assert (out / "report" / "index.html").exists()
    # What the README's table of outputs lists is there.
    for name in ("per_image.parquet", "per_product.parquet", "_features", "_done"):
        assert (out / name).is_dir(), name


@pytest.mark.slow  # trains encoders of the quick start's products
def test_personalize_example_trains_an_encoder_per_quickstart_product(quickstart, user_dir):
    proc = run(readme_command("personalize"), user_dir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert last_line(proc.stdout).endswith("restage personalize: done: 3 products")
    out = user_dir / readme_command("personalize").split()[-1]
    rows = pq.read_table(out / "_manifest").to_pylist()
    assert len(rows) == 3
    for row in rows:  # what the README's table of outputs lists is there
        folder = Path(row["encoder_uri"])
        for name in ("adapter_config.json", "adapter_model.safetensors", "encoder.json"):
            assert (folder / name).is_file(), (folder, name)
        assert row["hard_negatives"] > 0 and row["loss_last"] < row["loss_first"], row


@pytest.mark.slow  # measures the encoders of the personalize example
def test_personalize_evaluate_example_measures_the_quickstart_encoders(quickstart, user_dir):
    encoders = user_dir / readme_command("personalize").split()[-1]
    if not (encoders / "_summary.json").exists():  # run alone: train them first
        assert run(readme_command("personalize"), user_dir).returncode == 0
    proc = run(readme_command("personalize-evaluate"), user_dir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = user_dir / readme_command("personalize-evaluate").split()[-1]
    rows = pq.read_table(out / "results.parquet").to_pylist()
    # what the README's table of outputs lists is there: each product x encoder x task
    assert {r["product_id"] for r in rows} == {"mug-red-001", "bottle-teal-002", "cereal-box-003"}
    assert {r["encoder"] for r in rows} == {"personal", "pretrained"}
    assert {r["task"] for r in rows} >= {"classification", "retrieval", "detection", "segmentation"}
    assert json.loads((out / "summary.json").read_text())
    assert (out / "report" / "index.html").is_file()


@pytest.mark.slow  # rates the quick start's run
def test_review_example_rates_the_quickstart_run(quickstart, user_dir):
    """The README's rating round on the quick start's tiny run: three raters added with its
    command, its server, every image rated in Chromium with the keyboard, then its results
    command, whose pass rate equals the count by hand."""
    import httpx

    from tests.browser import chromium_browser
    from tests.review_client import passes, rate_all, sign_in

    add = readme_command("review-add-rater")
    assert " ann " in add
    secrets = {}
    for name in ("ann", "bob", "cat"):
        proc = run(add.replace(" ann ", f" {name} "), user_dir)
        assert proc.returncode == 0, proc.stderr
        secrets[name] = proc.stdout.strip()
    log = user_dir / "review-serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            ["bash", "-c", f"exec {readme_command('review-serve')}"],
            cwd=user_dir,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = "http://127.0.0.1:8100"
    try:
        for _ in range(120):
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        rated: dict[str, list[str]] = {}
        with chromium_browser() as browser:
            for name, secret in secrets.items():
                page = browser.new_context().new_page()
                sign_in(page, url, name, secret)
                rated[name] = rate_all(page, name)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    proc = run(readme_command("review-results"), user_dir)
    assert proc.returncode == 0, proc.stderr
    out = user_dir / readme_command("review-results").split()[-1]
    summary = json.loads((out / "summary.json").read_text())["runs"]["restage"]
    written = pq.read_table(quickstart[1] / "generations" / "manifest").column("image_uri")
    images = sum(uri is not None for uri in written.to_pylist())
    keys = set(rated["ann"])
    assert len(keys) == images and all(set(r) == keys for r in rated.values())
    passed = sum(sum(passes(name, key) for name in rated) >= 2 for key in keys)
    assert summary["images_rated"] == images and summary["images_pending"] == 0
    assert (summary["per_image"]["passed"], summary["per_image"]["total"]) == (passed, images)


@pytest.mark.slow  # indexes the examples' scenes and stages the examples into them
def test_stage_example_indexes_and_stages_the_examples(user_dir):
    proc = run(readme_command("stage"), user_dir, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert last_line(proc.stdout).endswith("restage stage: done: 3 products")
    staged = pq.read_table(user_dir / "runs" / "staged" / "manifest").to_pylist()
    kept = [r for r in staged if r["kept"]]
    keep = load_config("tiny").stage.keep
    assert sorted({r["product_id"] for r in kept}) == sorted({r["product_id"] for r in staged})
    assert len(kept) == 3 * keep
    for r in kept:  # another product's scene, an image and its clip written
        assert r["scene_product_id"] != r["product_id"]
        assert Path(r["image_uri"]).is_file() and all(Path(u).is_file() for u in r["clip_uris"])

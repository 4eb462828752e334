"""What a job's Ray Data tasks pay to import their functions' module. A task runs in a
worker process that imports the module its function lives in: `pipelines.augment` and
`pipelines.generate` imported torch (through the actors and `ray_app.models`) at module
level, so each new worker spent ~1.2 s of CPU on it; they now import the model libraries
in the stages' actors only.

Two measures, alternated over fresh processes:
- each task module's import, wall seconds in a fresh interpreter (and whether torch came);
- a Ray Data pass of 8 blocks on a fresh local Ray (4 CPUs) whose function's module imports
  the job's module as it is now ("restage") against the same plus ``import torch`` (what the
  module did before, "torch in the module").

    python bench/task_imports.py                # 3 repeats
    python bench/task_imports.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402

MODULES = ("pipelines.augment", "pipelines.generate", "pipelines.train")
IMPORT = (
    "import sys, time\nt = time.perf_counter()\nimport {module}\n"
    "print(time.perf_counter() - t, 'torch' in sys.modules)\n"
)
PASS = """
import sys, time
sys.path.insert(0, {folder!r})
import ray, ray.data
ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
         runtime_env={{"env_vars": {{"PYTHONPATH": {path!r}}}}})
ray.data.DataContext.get_current().enable_progress_bars = False
import {name}
t = time.perf_counter()
ray.data.range(8, override_num_blocks=8).map_batches({name}.fn).count()
print(time.perf_counter() - t)
ray.shutdown()
"""
SETTINGS = {
    "restage": "import pipelines.augment, pipelines.generate\n",
    "torch in the module": "import torch\nimport pipelines.augment, pipelines.generate\n",
}


def python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
    return done.stdout.split("\n")[-2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "task_imports_cpu.json"))
    args = parser.parse_args()

    imports: dict[str, dict] = {}
    for module in MODULES:
        runs = [python(IMPORT.format(module=module)).split() for _ in range(args.repeats)]
        imports[module] = {
            "median_seconds": round(statistics.median(float(r[0]) for r in runs), 3),
            "imports_torch": runs[0][1] == "True",
        }
        print(module, imports[module], flush=True)

    passes: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as folder:
        for name, header in SETTINGS.items():
            mod = "mod_" + name.replace(" ", "_")
            Path(folder, mod + ".py").write_text(header + "def fn(batch):\n    return batch\n")
        path = os.pathsep.join([folder, str(ROOT)])
        for i in range(args.repeats):
            order = list(SETTINGS) if i % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                mod = "mod_" + name.replace(" ", "_")
                code = PASS.format(folder=folder, path=path, name=mod)
                passes[name].append(round(float(python(code)), 3))
                print(name, passes[name][-1], flush=True)

    result = {
        "bench": "task_imports",
        "machine": machine(),
        "repeats": args.repeats,
        "module_import": imports,
        "ray_data_pass_of_8_blocks_fresh_ray": {
            name: {"median_seconds": round(statistics.median(v), 3), "all_seconds": v}
            for name, v in passes.items()
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ray_data_pass_of_8_blocks_fresh_ray"], indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()

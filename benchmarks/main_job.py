"""The main job with its defaults, timed: `accelerate launch examples/train.py` (no arguments).

    python benchmarks/main_job.py [--work-dir DIR] [-- extra train.py flags]

Runs the command in a fresh output folder, and writes benchmarks/results/main_job.json: the wall
time against the 15-minute goal (2 CPU cores), the phases (data, training, generation,
evaluation), the training steps the time budget allowed, the loss components at the last
logging step, the generation monitor's figures at each evaluation, and the headline metrics of
the generated cohort against the floor and the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "main_job.json"
GOAL_MINUTES = 15.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default=str(REPO / "benchmarks" / "work" / "main_job"))
    p.add_argument("extra", nargs="*", help="extra examples/train.py flags (after --)")
    args = p.parse_args()
    work = Path(args.work_dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    cmd = [accelerate, "launch", str(REPO / "examples" / "train.py"), *args.extra]
    t0 = time.perf_counter()
    with open(work / "output.log", "w") as log:
        proc = subprocess.run(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.perf_counter() - t0) / 60
    run = json.loads((work / "promptehr_run" / "run_summary.json").read_text()) if proc.returncode == 0 else {}
    states = sorted((work / "promptehr_run" / "checkpoints").glob("checkpoint-*/trainer_state.json"),
                    key=lambda q: int(q.parent.name.split("-")[1]))
    history = json.loads(states[-1].read_text())["log_history"] if states else []
    result = {
        "command": "accelerate launch examples/train.py " + " ".join(args.extra),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "exit_code": proc.returncode,
        "wall_minutes": round(minutes, 2),
        "goal_minutes": GOAL_MINUTES,
        "within_goal": proc.returncode == 0 and minutes <= GOAL_MINUTES,
        "phases_minutes": {k: run.get(k) for k in ("data_minutes", "train_minutes", "time_model_minutes",
                                                   "calibration_minutes", "generate_minutes", "evaluate_minutes",
                                                   "total_minutes")},
        "global_step": run.get("global_step"),
        "train_examples": run.get("train_examples"),
        "parameters": run.get("parameters"),
        "last_training_log": run.get("last_log"),
        "generation_monitor": [{k: v for k, v in h.items() if k.startswith("gen_") or k == "step"}
                               for h in history if "gen_distinct_codes" in h],
        "evaluation_losses": [{k: h[k] for k in ("step", "eval_loss", "eval_loss_lm", "eval_loss_cooc") if k in h}
                              for h in history if "eval_loss" in h],
        "metrics": run.get("metrics"),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("command", "wall_minutes", "within_goal", "phases_minutes",
                                             "global_step", "metrics")}, indent=1))
    return 0 if result["within_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())

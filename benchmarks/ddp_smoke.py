"""Two-process CPU data-parallel smoke run of examples/train.py.

    python benchmarks/ddp_smoke.py

runs, with ``ACCELERATE_USE_CPU=true``,

    accelerate launch --multi_gpu --num_processes 2 examples/train.py --patients 400 <tiny model> --max-steps 6 ...

(``--cpu --num_processes 2`` would silently run ONE process) and checks that both processes ran
(world size 2 in the run summary and in each process's log line), that the loss components were
logged, and that training reached its last step. Writes benchmarks/results/ddp_smoke.json with
the command, the checks and the tail of the output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "ddp_smoke.json"
TINY = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
        "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "prompt_hidden_size": 16}
STEPS = 6


def main() -> int:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    if accelerate is None:
        raise SystemExit("ddp_smoke: the accelerate CLI is not installed")
    work = Path(tempfile.mkdtemp(prefix="promptehr-ddp-"))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           str(REPO / "examples" / "train.py"), "--output-dir", str(work / "run"), "--patients", "400",
           "--config-overrides", json.dumps(TINY), "--max-steps", str(STEPS), "--batch-size", "8",
           "--logging-steps", "2", "--eval-steps", "3", "--save-steps", "3", "--eval-examples", "32",
           "--eval-generate-patients", "8", "--max-source-length", "64", "--warmup-steps", "0", "--generate", "20"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
    seconds = time.perf_counter() - t0
    output = proc.stdout + proc.stderr
    try:
        summary_path = work / "run" / "run_summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        state_path = work / "run" / "checkpoints" / f"checkpoint-{STEPS}" / "trainer_state.json"
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    process_lines = sorted(set(re.findall(r"process (\d) of (\d) \(world size (\d)\)", output)))
    logged = [h for h in state.get("log_history", []) if "loss_cooc" in h]
    checks = {
        "exit_code_0": proc.returncode == 0,
        "run_summary_world_size_2": summary.get("world_size") == 2,
        "both_processes_reported": process_lines == [("0", "2", "2"), ("1", "2", "2")],
        "reached_last_step": summary.get("global_step") == STEPS,
        "loss_components_logged": bool(logged) and all(
            f"loss_{c}" in h for h in logged for c in ("lm", "age", "sex", "cooc")),
    }
    result = {
        "command": "ACCELERATE_USE_CPU=true " + " ".join(cmd[:1] and ["accelerate"] + cmd[1:]),
        "seconds": round(seconds, 1),
        "checks": checks,
        "passed": all(checks.values()),
        "run_summary": {k: summary.get(k) for k in ("world_size", "num_processes", "torch_threads", "global_step",
                                                    "train_examples", "generated_patients", "train_loss")},
        "process_lines": [f"process {a} of {b} (world size {c})" for a, b, c in process_lines],
        "log_history": logged,
        "output_tail": [line for line in output.splitlines() if line.strip()][-25:],
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: result[k] for k in ("command", "seconds", "checks", "passed", "run_summary",
                                             "process_lines")}, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

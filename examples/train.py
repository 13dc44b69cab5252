"""The main job for ``accelerate launch``: ``promptehr train`` with the same flags.

    accelerate launch examples/train.py                      # simulated cohort, small preset, ~15 min on 2 cores
    accelerate launch examples/train.py --mimic-dir DIR      # a real MIMIC-III folder
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/train.py ...   # 2 CPU processes
"""

import os
import sys

# Idle OpenMP threads sleep instead of spinning; set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from promptehr_hf.modeling_promptehr.training.pipeline import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])

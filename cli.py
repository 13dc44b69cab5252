"""The `promptehr` console command: it only dispatches.

Each subcommand lives in the module that owns its feature; that module exposes
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when their
subcommand runs, so `promptehr --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = {
    "prepare": ("promptehr_hf.datasets_scripts.prepare", "read a MIMIC-III folder into Parquet splits and summary.json"),
    "simulate": ("promptehr_hf.datasets_scripts.simulator", "write the built-in simulated cohort as MIMIC-III CSVs"),
    "train": ("promptehr_hf.modeling_promptehr.training.pipeline",
              "train on a MIMIC-III folder or the simulated cohort, then generate and evaluate"),
    "generate": ("promptehr_hf.modeling_promptehr.generation.command", "generate synthetic patients from a trained model"),
    "evaluate": ("promptehr_hf.metrics.report", "score a synthetic cohort against real data; write metrics and plots"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="promptehr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    # Idle OpenMP threads sleep instead of spinning (before torch is imported): on a 2-core
    # machine shared with other work, spinning threads made training steps up to 20x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Build only the parser of the requested subcommand; list the others by name.
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if argv and argv[0] == name:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

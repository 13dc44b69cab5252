"""Synthetic MIMIC-style patients: prepare a cohort, train, generate, evaluate.

The `promptehr` console command only dispatches. Each subcommand lives in the module that owns
its feature; that module exposes `add_arguments(parser)`, `run(args) -> int` and optionally
`validate(args)`, the cheap checks that run before anything heavy loads. Modules are imported
only when their subcommand runs, so `promptehr --help` stays fast.

User errors (a bad argument, a missing or unreadable input, a refused output folder: ValueError,
OSError) print one line, ``promptehr COMMAND: error: ...``, on stderr and exit with code 2;
``--debug`` or the environment variable ``PROMPTEHR_DEBUG=1`` shows the traceback instead. An
interruption (Ctrl-C, SIGTERM) exits with 130 or 143; the folder being written is abandoned and
an earlier output there stays as it was (``promptehr_hf.file_utils``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import traceback

SUBCOMMANDS = {
    "prepare": ("promptehr_hf.datasets_scripts.prepare",
                "read a MIMIC-III folder into Parquet splits and summary.json"),
    "simulate": ("promptehr_hf.datasets_scripts.simulator", "write the built-in simulated cohort as MIMIC-III CSVs"),
    "train": ("promptehr_hf.modeling_promptehr.training.pipeline",
              "train on a MIMIC-III folder or the simulated cohort, then generate and evaluate"),
    "generate": ("promptehr_hf.modeling_promptehr.generation.command",
                 "generate synthetic patients from a trained model"),
    "evaluate": ("promptehr_hf.metrics.report", "score a synthetic cohort against real data; write metrics and plots"),
}
USER_ERRORS = (ValueError, OSError)  # includes Mimic3Error, OutputFolderError, FileNotFoundError, UnicodeDecodeError
DEBUG_HELP = "show Python tracebacks for errors (also: environment variable PROMPTEHR_DEBUG=1)"


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the writers' cleanup runs."""


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="promptehr", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    # Idle OpenMP threads sleep instead of spinning (before torch is imported): on a 2-core
    # machine shared with other work, spinning threads made training steps up to 20x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Build only the parser of the requested subcommand; list the others by name.
    requested = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if requested == name:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
            p.set_defaults(_run=module.run, _validate=getattr(module, "validate", None))
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("PROMPTEHR_DEBUG", "").strip() not in ("", "0")
    prog = f"promptehr {args.command}"
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        if args._validate is not None:
            args._validate(args)
        return int(args._run(args) or 0)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        if debug:
            traceback.print_exc()
        message = _one_line(e.code)
        print(message if message.startswith(prog) else f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

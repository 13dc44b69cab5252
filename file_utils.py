"""Atomic writes and output-folder guards: the one way every command of the package writes files.

One failure behaviour everywhere: the earlier file or folder survives any failure or
interruption. A file or folder is first written beside its destination under a hidden
temporary name and renamed onto the destination only once complete.

Writing:

- ``atomic_write(path, write_fn)``: ``write_fn(tmp)`` writes the temporary file ``tmp`` (a str
  beside ``path``, ending like ``path``), which is then renamed onto ``path``. On any exception
  the temporary is removed and ``path`` is as it was.
- ``atomic_write_all({path: write_fn})``: several files replaced together: every temporary is
  written before the first rename.
- ``write_json_atomic(path, obj)`` / ``write_text_atomic(path, text)``.
- ``replace_folder(out, command)``: a context manager yielding an empty temporary folder
  ``.NAME.tmp-PID-XXXXXXXX`` beside ``out``; on a clean exit it writes the manifest
  (``MANIFEST``: the command and the files it wrote) there and swaps the folder in: an existing
  ``out`` is renamed aside to ``.NAME.old-PID-XXXXXXXX``, the new folder renamed onto ``out``,
  then the old one deleted; if the second rename fails the old folder is renamed back. On an
  exception in the block the temporary is deleted and ``out`` is untouched.

Guards (each refusal is an ``OutputFolderError`` naming the path, raised before anything is
written or deleted):

- ``check_separate(out, inputs)``: ``out`` must not be, lie inside or contain an input.
- ``check_replaceable(out, command)``: ``out`` is missing, an empty folder, or a folder holding
  nothing but an earlier output of the same command (every file in it is listed by its manifest).
- ``check_output(out, command, inputs)``: both, after ``remove_stale(out)``.
- ``remove_stale(path)``: deletes the temporaries and set-aside folders beside ``path`` that a
  killed run left (their PID no longer runs on this machine); a set-aside earlier output whose
  ``path`` is missing (killed between the two renames) is renamed back onto ``path``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = ".promptehr-manifest.json"
MANIFEST_FORMAT = "promptehr-output/1"

PathLike = str | os.PathLike


class OutputFolderError(FileExistsError):
    """A command refuses an output path (it is an input, holds other files, ...); nothing was written."""


# ----------------------------------------------------------------------------- temporaries
def _sibling(path: Path, kind: str) -> Path:
    """A new hidden name beside ``path``: ``.NAME.KIND-PID-HEX`` (+ the suffix of NAME)."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


def _stale_pattern(path: Path) -> re.Pattern:
    return re.compile(re.escape(f".{path.name}.") + r"(tmp|old)-(\d+)-[0-9a-f]{8}" + re.escape(path.suffix))


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def remove_stale(path: PathLike) -> list[Path]:
    """Clean up beside ``path`` after a run that was killed while writing it; returns what it removed.

    Temporaries (``.NAME.tmp-PID-*``) of processes that no longer run are deleted. A set-aside
    earlier output (``.NAME.old-PID-*``) is renamed back onto ``path`` when ``path`` is missing,
    else deleted. Entries of running processes (a concurrent write) are left alone.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    pattern = _stale_pattern(path)
    stale = []
    with os.scandir(parent) as entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match and not _running(int(match.group(2))):
                stale.append((match.group(1), parent / entry.name))
    removed = []
    olds = sorted((p for kind, p in stale if kind == "old"), key=lambda p: p.lstat().st_mtime, reverse=True)
    if olds and not os.path.lexists(path):
        os.replace(olds.pop(0), path)  # the earlier output, set aside just before the kill
    for _, entry in stale:
        if os.path.lexists(entry):
            _remove(entry)
            removed.append(entry)
    return removed


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; skipped where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- files
def atomic_write_all(writers: Mapping[PathLike, Callable[[str], Any]]) -> list[Path]:
    """Write several files, then rename them into place together; returns their paths.

    Each ``write_fn(tmp)`` writes the temporary file ``tmp`` (a str beside its path, ending like
    it). The renames start only once every temporary is written; on any exception before then
    every temporary is removed and no destination has changed.
    """
    plan = [(Path(p), fn) for p, fn in writers.items()]
    tmps: list[Path] = []
    try:
        for path, write_fn in plan:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(path)
            tmps.append(_sibling(path, "tmp"))
            write_fn(str(tmps[-1]))
            if not tmps[-1].is_file():
                raise OSError(f"{path}: the writer did not create its temporary file")
            _fsync(tmps[-1])
        for (path, _), tmp in zip(plan, tmps):
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps:
            _remove(tmp)
        raise
    for parent in {path.parent for path, _ in plan}:
        _fsync(parent)
    return [path for path, _ in plan]


def atomic_write(path: PathLike, write_fn: Callable[[str], Any]) -> Path:
    """``write_fn(tmp)`` writes a temporary file beside ``path``, renamed onto ``path`` once written.

    On any exception (or interruption) the temporary is removed and ``path`` is as it was.
    """
    return atomic_write_all({path: write_fn})[0]


def write_text_atomic(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see ``atomic_write``)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding=encoding))


def write_json_atomic(path: PathLike, obj: Any, indent: int | None = 1, **dumps_kwargs) -> Path:
    """Write ``obj`` as JSON (plus a final newline) to ``path`` atomically; ``dumps_kwargs`` go to json.dumps."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


# ----------------------------------------------------------------------------- guards
def check_separate(out: PathLike, inputs: Mapping[str, PathLike | None], out_flag: str = "--out") -> None:
    """Refuse an ``out`` that is, lies inside or contains one of ``inputs`` ({flag: path}, None skipped)."""
    o = Path(out).resolve()
    for flag, given in inputs.items():
        if given is None or given == "":
            continue
        i = Path(given).resolve()
        if o == i:
            how = "is"
        elif i in o.parents:
            how = "is inside"
        elif o in i.parents:
            how = "contains"
        else:
            continue
        raise OutputFolderError(f"{out_flag} {out} {how} the input {flag} {given}; "
                                "refusing to write there (choose another output folder)")


def read_manifest(folder: PathLike) -> dict | None:
    """The manifest of an output folder, or None if it has none (or an unreadable one)."""
    try:
        manifest = json.loads(Path(folder, MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return None
    return manifest


def _files(folder: Path) -> list[str]:
    """Every file and link under ``folder`` (relative, '/'-separated, sorted), the manifest excluded."""
    found = []
    for root, dirs, files in os.walk(folder):
        here = Path(root)
        found += [(here / f).relative_to(folder).as_posix() for f in files]
        found += [(here / d).relative_to(folder).as_posix() for d in dirs if (here / d).is_symlink()]
    return sorted(f for f in found if f != MANIFEST)


def check_replaceable(out: PathLike, command: str) -> None:
    """Refuse to replace ``out`` unless it is missing, an empty folder, or holds nothing but an
    earlier output of ``promptehr COMMAND`` (a manifest naming the command and listing every file)."""
    out = Path(out)
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise OutputFolderError(f"{out}: exists and is not a folder; refusing to replace it")
    if not any(out.iterdir()):
        return
    manifest = read_manifest(out)
    if manifest is None:
        raise OutputFolderError(f"{out}: not empty and not an earlier output of `promptehr {command}` (no "
                                f"{MANIFEST}); refusing to replace it (choose another folder or empty it)")
    if manifest.get("command") != command:
        raise OutputFolderError(f"{out}: holds an earlier output of `promptehr {manifest.get('command')}`, not of "
                                f"`promptehr {command}`; refusing to replace it")
    foreign = sorted(set(_files(out)) - set(map(str, manifest["files"])))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise OutputFolderError(f"{out}: holds files that `promptehr {command}` did not write ({foreign[0]}{more}); "
                                "refusing to replace it")


def check_output(out: PathLike, command: str, inputs: Mapping[str, PathLike | None] | None = None,
                 out_flag: str = "--out", replace: bool = True) -> Path:
    """The guard a command runs at its start, before any heavy work; returns ``out`` resolved.

    Removes what a killed earlier run left beside ``out`` (``remove_stale``), then refuses an
    ``out`` that is, lies inside or contains an input, and (``replace``) an ``out`` that
    ``replace_folder(out, command)`` would refuse to replace.
    """
    resolved = Path(out).resolve()
    check_separate(out, inputs or {}, out_flag)
    remove_stale(resolved)
    if replace:
        check_replaceable(resolved, command)
    return resolved


# ----------------------------------------------------------------------------- folders
def _new_folder(out: Path) -> Path:
    """Create an empty hidden temporary folder beside ``out`` (normal permissions, unlike mkdtemp)."""
    while True:
        tmp = _sibling(out, "tmp")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _swap(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` onto ``out``; an existing ``out`` is set aside first and restored if that fails."""
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    old = _sibling(out, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def replace_folder(out: PathLike, command: str, arguments: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """Write a folder, then swap it in for ``out`` as a whole (see the module docstring).

    Yields an empty temporary folder beside ``out``. ``out`` is checked with
    ``check_replaceable(out, command)`` before and again just before the swap. The manifest
    records ``command``, ``arguments`` (JSON-able) and the files written.
    """
    out = Path(out).resolve()
    remove_stale(out)
    check_replaceable(out, command)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_folder(out)
    try:
        yield tmp
        manifest = {"format": MANIFEST_FORMAT, "command": command, "files": _files(tmp)}
        if arguments is not None:
            manifest["arguments"] = dict(arguments)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str) + "\n", encoding="utf-8")
        for name in (*manifest["files"], MANIFEST):
            if (tmp / name).is_file():
                _fsync(tmp / name)
        check_replaceable(out, command)  # it may have appeared meanwhile
        _swap(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = [
    "MANIFEST", "OutputFolderError", "atomic_write", "atomic_write_all", "check_output", "check_replaceable",
    "check_separate", "read_manifest", "remove_stale", "replace_folder", "write_json_atomic", "write_text_atomic",
]

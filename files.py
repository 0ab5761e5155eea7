"""Writing files and folders whole or not at all, and reading the small JSON files the toolkit writes.

Every file the toolkit writes (images, JSON, caches, statistics) goes through atomic_file, and every folder it
replaces (checkpoints, final_model/, best_model/) through replace_folder. Temporary names carry the host name and
the process id: processes on several machines may share one output folder on a network file system, where
containers often have the same process ids.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

from config import UserError

PARTIAL = ".partial"  # the suffix of everything not yet complete: never read, and cleared before a new attempt
OLD = ".old"  # the suffix of a folder's previous version while replace_folder swaps in the new one


def temp_path(path: Path) -> Path:
    """A temporary name beside `path`, unique to this machine and process."""
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}{PARTIAL}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def read_json(path: str | os.PathLike) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} ({e}); is it a folder written by train_ddpm.py?") from None


def partial_folder(path: Path) -> Path:
    """Where a folder is written before replace_folder moves it into place (the same name for every process of a
    run, so that all of them can write into it)."""
    return path.with_name(path.name + PARTIAL)


def aside(path: Path) -> Path:
    """Where replace_folder keeps the old version of `path` while the new one moves in."""
    return path.with_name(path.name + OLD)


def current_version(path: Path) -> Path:
    """`path`, or its old version beside it while a replace_folder is between its two renames (or a crash stopped it
    there): what a reader opens."""
    return aside(path) if not path.exists() and aside(path).is_dir() else path


def restore_interrupted(path: Path) -> None:
    """Finish what a crash left of a replace_folder of `path` between its renames: the old version goes back under
    `path` when no new one arrived, and is deleted when one did."""
    old = aside(path)
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    shutil.rmtree(old, ignore_errors=True)


def replace_folder(complete: Path, path: Path) -> None:
    """Move a complete folder to `path`, replacing what is there: the old folder is renamed aside first, then the
    new one into place, then the old one deleted. A crash at any moment leaves a whole folder, new or old, under
    `path` or beside it (`path`.old, which current_version finds and restore_interrupted puts back), never a
    half-written one under `path`, and never neither."""
    restore_interrupted(path)  # an old version left aside by a crash is the only one: never delete it first
    if path.exists():
        os.replace(path, aside(path))
    os.replace(complete, path)
    shutil.rmtree(aside(path), ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; it replaces `path` (replace_folder) only if the block
    succeeds. For folders one process writes (final_model/, best_model/)."""
    path = Path(path)
    tmp = partial_folder(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def writable_folder(folder: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """Create the folder if needed and check that files can be written in it; a UserError naming the flag if
    not."""
    out = Path(folder).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / ".write-test") as probe:
            probe.touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise UserError(f"{flag.lstrip('-')} {out} is not writable ({e.strerror}); pass a writable {flag}") from None
    return out

"""Atomic file writes (temp file, fsync, os.replace, fsync of the folder) for JSON and checkpoints: a crash or a
power cut never leaves half a file under the final name."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

CKPT_REQUIRED_KEYS = (
    "model_state", "optimizer_state", "scheduler_state", "scaler_state", "epoch", "best_metric", "config_snapshot",
)
CKPT_OPTIONAL_KEYS = ("ema_state", "schema_version", "rng_state", "global_step", "oom_state", "task_state",
                      "progress")
CKPT_SCHEMA_VERSION = 1
T = TypeVar("T")


def ensure_dir(path: str | Path) -> Path:
    """Create `path` (and parents) if missing; return it as a Path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; done once, at import, not per write
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_read_umask()


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a folder's) data to disk: without it a rename can outlive the bytes it names."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the file itself was flushed
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path (`.<name>.*.tmp`) beside `path`; on success flush it and move it into place, on error
    delete it. A kill in between leaves only the temp file, which the next run may delete."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; give the file normal permissions
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# A JSON that names a data file by its hash (a calibration and its class Gaussians, an enrolment store and its
# means) is replaced together with that file in three steps, so that a reader never finds the JSON naming a file
# that is not the one it names: (1) `write_hashed` writes the new file under a name of its own hash, beside the old
# one; (2) the caller commits the JSON naming it (save_json, atomic); (3) `prune_hashed` removes the files the JSON
# no longer names. A kill at any point leaves the old pair or the new pair whole, plus at most a stray file.
def write_hashed(folder: str | Path, prefix: str, suffix: str, write: Callable[[Path], object]) -> tuple[Path, str]:
    """`write(path)` fills a staged file of its own (hidden, so that no prune takes it), which is then renamed
    `{prefix}{sha256[:16]}{suffix}`; returns (that file, its SHA-256). The folder's JSON has one writer at a time
    (the run's lock); a staged name of its own keeps another writer's file from being hashed as this one's."""
    folder = ensure_dir(folder)
    fd, name = tempfile.mkstemp(dir=folder, prefix=f".{prefix}staged-", suffix=suffix)
    os.close(fd)
    staged = Path(name)
    try:
        write(staged)
        digest = file_sha256(staged)
        final = folder / f"{prefix}{digest[:16]}{suffix}"
        os.replace(staged, final)
    finally:
        staged.unlink(missing_ok=True)  # gone already unless writing failed
    fsync_path(folder)
    return final, digest


def read_hashed(path: str | Path, sha256: str | None, load: Callable[[Path], T]) -> tuple[T | None, str | None]:
    """(load(path), None) for the file a JSON names with its SHA-256, else (None, "missing") or (None, "not named":
    another file under that name). A commit beside this reader may prune the file between any two of these steps:
    that reads as missing, never as an error."""
    path = Path(path)
    try:
        if file_sha256(path) != sha256:
            return None, "not named"
        return load(path), None
    except (FileNotFoundError, IsADirectoryError):
        return None, "missing"


def prune_hashed(folder: str | Path, prefix: str, suffix: str, keep: Iterable[Path] = ()) -> None:
    """After the JSON is committed: remove every `{prefix}*{suffix}` file but `keep` (nothing names them now)."""
    kept = {Path(k).name for k in keep}
    for old in Path(folder).glob(f"{prefix}*{suffix}"):
        if old.name not in kept:
            old.unlink(missing_ok=True)


class DiskSpaceError(ValueError):
    """What is about to be written would not fit on its disk: raised before a byte is written."""


SPACE_MARGIN = 1.05  # headers, indexes, and room for the checkpoints and logs that share the disk


def space_short(directory: str | Path, need: int) -> tuple[int, int] | None:
    """(bytes needed with SPACE_MARGIN to spare, bytes free) when writing `need` bytes under `directory` would not
    fit on its disk, else None."""
    import shutil

    need = int(need * SPACE_MARGIN)
    free = shutil.disk_usage(directory).free
    return (need, free) if need > free else None


def check_free_space(directory: str | Path, need: int, what: str, remedy: str) -> None:
    """Refuse to start writing `need` bytes of `what` under `directory` when its disk has less free (with
    SPACE_MARGIN to spare): a disk that fills mid-run also fails the checkpoints and logs written beside it."""
    short = space_short(directory, need)
    if short is not None:
        raise DiskSpaceError(f"{what} needs {_size(short[0])} under {directory}, but only {_size(short[1])} are "
                             f"free there: {remedy}")


def _size(size: int) -> str:
    return f"{size / 1e9:,.1f} GB" if size >= 1e9 else f"{size / 1e6:,.1f} MB"


def save_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_json(path: str | Path, obj: Any, keep_same: bool = False) -> None:
    """Write `obj` as UTF-8 JSON (Korean unescaped), atomically. `keep_same`: a file that already holds exactly
    that text is left as it is, its time kept."""
    text = json.dumps(obj, ensure_ascii=False, indent=2, default=str)
    if keep_same:
        try:
            if Path(path).read_text(encoding="utf-8") == text:
                return
        except (OSError, UnicodeDecodeError):
            pass
    save_text(path, text)


def read_json(path: str | Path) -> Any:
    """Read a JSON file; errors name the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"Invalid JSON in {path}: {err}") from err


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line (a whole line per write, so a tailing reader never sees half a record). A file whose
    last line was cut off (a crash or a full disk mid-write) gets its line ended first, so that the cut line stays
    the only one lost instead of swallowing this record too."""
    ensure_dir(Path(path).parent)
    line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
    with open(path, "a+b") as fh:
        if fh.tell():  # appending: the position is the end
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                line = b"\n" + line
        fh.write(line)


def save_ckpt(path: str | Path, obj: dict) -> None:
    """Save a checkpoint of the design's schema atomically; refuses a dict missing a required key."""
    missing = [k for k in CKPT_REQUIRED_KEYS if k not in obj]
    extra = [k for k in obj if k not in CKPT_REQUIRED_KEYS + CKPT_OPTIONAL_KEYS]
    if missing or extra:
        raise ValueError(f"Checkpoint schema violation: missing {missing}, unexpected {extra}")
    import torch  # lazily: JSON-only users (the data scan) should not pay for importing torch

    with atomic_path(path) as tmp:
        try:
            torch.save({**obj, "schema_version": CKPT_SCHEMA_VERSION}, tmp)
        except (RuntimeError, OSError) as err:
            full = _disk_full_or(err, path)
            if full is err:
                raise
            raise full from err


# Free space under which a failed write is put down to a full disk: torch's writer reports ENOSPC as "basic_ios::
# clear: iostream error" and "unexpected pos", which name neither the file nor the disk.
FULL_DISK_BYTES = 64 * 2**20


def _disk_full_or(err: Exception, path: str | Path) -> Exception:
    """`err` itself, or, when the disk `path` is on is (nearly) full, an ENOSPC OSError that says so (measured
    while the partial file still holds its space)."""
    import errno
    import shutil

    if isinstance(err, OSError) and err.errno not in (None, errno.ENOSPC, errno.EDQUOT):
        return err
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return err
    if free >= FULL_DISK_BYTES:
        return err
    return OSError(errno.ENOSPC, f"Checkpoint {path} could not be written: the disk holding it is full "
                                 f"({_size(free)} free); make room there (old experiments, *_emergency.pt, "
                                 f"stage*_best.pt) and resume")


def load_ckpt(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Load a checkpoint written by save_ckpt; a missing or foreign file gives a clear error. `mmap`: the tensors
    are mapped from the file, not read (to look at a checkpoint's fields without reading its weights)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        except RuntimeError:  # mapped only from the zip serialization (torch.save's default since 1.6): read it
            if not mmap:
                raise
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises many unrelated types for a corrupt file
        raise ValueError(f"Cannot read checkpoint {path}: {err}") from err
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CKPT_REQUIRED_KEYS):
        raise ValueError(f"{path} is not a PillSnap checkpoint (expected keys {list(CKPT_REQUIRED_KEYS)}).")
    return ckpt


def select_inference_state(ckpt: dict) -> dict:
    """The weights a checkpoint's run validated: EMA when saved and train.ema.validate is ema/both, else raw."""
    mode = ((ckpt.get("config_snapshot") or {}).get("train", {}).get("ema", {}) or {}).get("validate", "ema")
    if ckpt.get("ema_state") is not None and mode in ("ema", "both"):
        return ckpt["ema_state"]
    return ckpt["model_state"]

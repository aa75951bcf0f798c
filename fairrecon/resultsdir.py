"""A results folder is fairrecon's own: marked, never mixed with the run's inputs, never stale.

An audit's identity is what decides its numbers: the spec fields that change results (plus the
device type), a fingerprint of its inputs (the labels CSV's content; the listing, with sizes and
modification times, of the image folder or dataset files; scikit-learn's version for digits), and
the version of the numbers fairrecon computes (version.RESULTS_VERSION).

  OUT/fairrecon.json  the marker, written before any other file:
                      {"written_by": "fairrecon", "version",
                       "identity": {spec_hash, fields, inputs, results_version},
                       "complete": true once every result file of that identity is written}

Before anything is written, `check_out` refuses (one line): a non-empty folder without the marker
(not fairrecon's, so its files may be the user's), a folder that holds the run's inputs or lies
inside its image folder, and (unless forced) a folder whose audit had another identity, naming what
changed: first a folder whose numbers another results version computed (both versions named). While a run
writes a folder it holds OUT/.fairrecon.lock (`writing`): a second run on the same folder is refused, whichever
machine it runs on (where the file system has locks). Folders written before the marker existed (summary.json
or cells/audit.json, no marker) are still read, and written into when their spec matches (their cells lack an
input fingerprint, so they are trained again).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import file_sha256, fingerprint
from .errors import UserError
from .fileio import atomic_write
from .spec import AuditSpec
from .version import RESULTS_VERSION, __version__

MARKER = "fairrecon.json"
LOCK = ".fairrecon.lock"  # held by the one run writing the folder; not a result (see `writing`)
# Spec fields that do not change the numbers: where results go, whether to download,
# and the device *name* ("auto" and "cpu" on a CPU-only machine are the same run;
# the resolved device type is hashed instead).
NOT_HASHED = ("out", "download", "device")
# The results version of folders written before it was recorded (fairrecon 0.1.0). Their identity hash
# leaves it out, as theirs did, so they resume as before; any later results version is hashed.
FIRST_RESULTS_VERSION = 1


def result_fields(spec: AuditSpec, device_type: str) -> dict[str, Any]:
    """The spec fields that decide an audit's numbers, plus the device type they ran on."""
    fields = {k: v for k, v in spec.to_dict().items() if k not in NOT_HASHED}
    fields["device_type"] = device_type
    return fields


def spec_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def input_fingerprint(spec: AuditSpec) -> dict[str, Any]:
    """The inputs an audit of `spec` reads, as they are now (see the module docstring)."""
    inputs: dict[str, Any] = {"data": fingerprint(spec.dataset, spec.data_root)}
    if spec.labels is not None:
        inputs["labels"] = {"file": spec.labels, "sha256": file_sha256(spec.labels)}
    return inputs


@dataclass(frozen=True)
class Identity:
    """What an audit's results depend on; two runs with the same hash give the same numbers."""

    fields: dict[str, Any]
    inputs: dict[str, Any] | None  # None: not recorded (a folder from before input fingerprints)
    results_version: int  # of the fairrecon that computed the numbers (version.RESULTS_VERSION)

    @property
    def hash(self) -> str:
        hashed: dict[str, Any] = {"fields": self.fields, "inputs": self.inputs}
        if self.results_version != FIRST_RESULTS_VERSION:
            hashed["results_version"] = self.results_version
        return spec_hash(hashed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec_hash": self.hash,
            "fields": self.fields,
            "inputs": self.inputs,
            "results_version": self.results_version,
        }

    @classmethod
    def of(cls, spec: AuditSpec, device_type: str) -> Identity:
        """The identity of an audit of `spec` run now, by this fairrecon."""
        return cls(result_fields(spec, device_type), input_fingerprint(spec), RESULTS_VERSION)


def input_paths(spec: AuditSpec) -> tuple[list[Path], list[Path]]:
    """(files, folders) an audit of `spec` reads: results may hold none of them and lie in no such folder."""
    files = [Path(spec.labels)] if spec.labels else []
    folders = [Path(spec.data_root)] if spec.dataset == "folder" else []
    if spec.dataset not in ("digits", "folder"):
        from .data import dataset_files

        files += dataset_files(spec.dataset, spec.data_root)
    return files, folders


def check_out(
    out: str | Path,
    identity: Identity,
    *,
    files: Iterable[Path] = (),
    folders: Iterable[Path] = (),
    force: bool = False,
    remedy: str = "pass another --out folder, or --force to replace it (and retrain)",
) -> None:
    """Refuse (UserError, one line) to write `identity`'s results into `out`; reads only.

    `files` and `folders` are the run's inputs. `force` lets a folder of another audit be replaced,
    never a folder that is not fairrecon's or that holds the inputs. `remedy`: what the refusal of a
    folder of another audit tells the user to do.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} is an existing file, not a folder; pass another --out")
    here = out.resolve()
    for path in files:
        if path.exists() and path.resolve().is_relative_to(here):
            raise UserError(
                f"output folder {out} holds this run's input {path}; results must not be written "
                "beside (or over) their inputs: pass another --out"
            )
    for folder in folders:
        if folder.is_dir() and here.is_relative_to(folder.resolve()):
            raise UserError(
                f"output folder {out} is inside the image folder {folder}; results must not be written "
                "among the images they measure: pass an --out outside it"
            )
    if not out.is_dir() or not _entries(out):
        return
    old = previous_identity(out)
    if old is None:
        raise UserError(
            f"output folder {out} is not empty and was not written by fairrecon (no {MARKER}); "
            "pass a new or empty folder as --out (fairrecon will not overwrite files it does not own)"
        )
    if old.results_version != identity.results_version and not force:
        written_by = (read_marker(out) or {}).get("version")
        raise UserError(
            f"{out} holds results version {old.results_version} (written by "
            f"{f'fairrecon {written_by}' if written_by else 'an older fairrecon'}); this "
            f"fairrecon {__version__} computes results version {identity.results_version}, whose numbers differ: "
            "pass another --out folder, or --force to replace it (and retrain)"
        )
    if force or old.hash == identity.hash:
        return
    if old.fields != identity.fields:
        changed = [
            f"{k} {old.fields.get(k, '(unset)')!r} -> {identity.fields.get(k, '(unset)')!r}"
            for k in sorted(set(old.fields) | set(identity.fields))
            if old.fields.get(k) != identity.fields.get(k)
        ]
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        what = f"holds an audit with a different spec ({shown})"
    elif old.inputs is None:
        return  # a folder from before input fingerprints: its cells do not match the new hash and are retrained
    else:
        what = "holds an audit of other inputs: " + "; ".join(_input_changes(old.inputs, identity.inputs or {}, out))
    raise UserError(f"{out} {what}; {remedy}")


def _input_changes(old: dict[str, Any], new: dict[str, Any], out: Path) -> list[str]:
    """Plain words for each input that differs: '<file> changed since OUT was written (...)'."""
    said = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key) or {}, new.get(key) or {}
        if a == b:
            continue
        if key == "labels":
            name = b.get("file") or a.get("file")
            said.append(
                f"{name} changed since {out} was written (sha256 {a.get('sha256')} -> {b.get('sha256')})"
                if a.get("file") == b.get("file")
                else f"labels CSV {a.get('file')} -> {b.get('file')}"
            )
        elif "scikit-learn" in a or "scikit-learn" in b:
            said.append(f"scikit-learn's digits: scikit-learn {a.get('scikit-learn')} -> {b.get('scikit-learn')}")
        else:
            where = "the image folder" if b.get("dataset") == "folder" else f"the {b.get('dataset')} dataset files"
            if (a.get("files"), a.get("bytes")) == (b.get("files"), b.get("bytes")):
                detail = f"the same {b.get('files')} files, but modification times differ"
            else:
                detail = (
                    f"{a.get('files')} files, {a.get('bytes')} bytes -> {b.get('files')} files, {b.get('bytes')} bytes"
                )
            said.append(f"{where} changed since {out} was written ({detail})")
    return said


def _entries(folder: Path) -> list[Path]:
    """What a folder holds besides a run's lock file."""
    return [p for p in folder.iterdir() if p.name != LOCK]


@contextmanager
def writing(out: str | Path) -> Iterator[None]:
    """Hold OUT's lock while this process writes OUT: another process that tries is refused in one line.

    Re-entrant within a process (the CLI holds it around `run_audit`, which takes it too). OUT is created
    if needed; when the run leaves OUT without fairrecon's marker (it failed or was refused before writing),
    the lock file and a folder made here (if empty) are removed again. The lock is an OS file lock (filelock:
    fcntl on POSIX), so it reaches other machines only where the shared file system supports locks.
    """
    from filelock import FileLock, Timeout

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} is an existing file, not a folder; pass another --out")
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to output folder {out}: {e.strerror or e}") from None
    lock = FileLock(out / LOCK, timeout=0, is_singleton=True)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(
            f"{out} is being written by another fairrecon run (it holds {out / LOCK}); wait for that run to "
            "finish, or pass another --out"
        ) from None
    try:
        yield
    finally:
        lock.release()
        if not lock.is_locked and not (out / MARKER).exists():  # nothing of fairrecon's written: leave no trace
            with suppress(OSError):
                (out / LOCK).unlink(missing_ok=True)
                if made:
                    out.rmdir()


def read_marker(out: str | Path) -> dict[str, Any] | None:
    """The marker's content, or None when the folder has none."""
    path = Path(out) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
        if marker.get("written_by") != "fairrecon":
            raise ValueError("not written by fairrecon")
        return marker
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: cannot read fairrecon's marker ({e}); pass another --out folder") from None


def previous_identity(out: str | Path) -> Identity | None:
    """The identity of the audit in `out`: from the marker, else from a folder an older fairrecon wrote
    (cells/audit.json or summary.json; inputs unknown); None when the folder is not fairrecon's."""
    out = Path(out)
    marker = read_marker(out)
    if marker is not None:
        ident = marker.get("identity") or {}
        version = ident.get("results_version", FIRST_RESULTS_VERSION)
        return Identity(ident.get("fields") or {}, ident.get("inputs"), version)
    try:
        legacy = out / "cells" / "audit.json"
        if legacy.is_file():
            return Identity(json.loads(legacy.read_text())["fields"], None, FIRST_RESULTS_VERSION)
        summary = out / "summary.json"
        if summary.is_file():
            data = json.loads(summary.read_text())
            if "fairrecon_version" not in data:
                return None
            spec = AuditSpec.from_dict(data["spec"], str(summary))
            fields = result_fields(spec, str(data.get("info", {}).get("device", "cpu")).split(":")[0])
            return Identity(fields, None, FIRST_RESULTS_VERSION)
    except (OSError, ValueError, KeyError, TypeError, UserError) as e:
        raise UserError(f"{out}: cannot read the audit already there ({e}); pass another --out folder") from None
    return None


def claim(out: str | Path, identity: Identity) -> None:
    """Mark `out` as the folder of `identity`'s audit, before any other file is written in it.

    The marker says "complete" only while the result files are that identity's: a new identity is
    recorded as incomplete until `mark_complete`.
    """
    out = Path(out)
    marker = read_marker(out) if out.is_dir() else None
    if marker is not None and (marker.get("identity") or {}).get("spec_hash") == identity.hash:
        return
    _write_marker(out, identity, complete=False)


def mark_complete(out: str | Path, identity: Identity) -> None:
    """After the last result file (summary.json): the folder holds `identity`'s complete results."""
    _write_marker(Path(out), identity, complete=True)


def require_complete(folder: str | Path) -> None:
    """For readers (report, check): refuse a folder whose audit started but did not finish writing."""
    marker = read_marker(folder)
    if marker is not None and not marker.get("complete"):
        raise UserError(
            f"{folder}: the audit writing this folder did not finish (it failed or was interrupted), "
            "so its result files may be from an earlier audit; run the audit again to finish it"
        )


def _write_marker(out: Path, identity: Identity, complete: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(
            out / MARKER,
            json.dumps(
                {
                    "written_by": "fairrecon",
                    "version": __version__,
                    "identity": identity.to_dict(),
                    "complete": complete,
                },
                indent=2,
                default=str,
            )
            + "\n",
        )
    except OSError as e:
        raise UserError(f"cannot write to output folder {out}: {e.strerror or e}") from None

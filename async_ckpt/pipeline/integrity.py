"""Integrity: a per-directory manifest of durable checkpoints, and verification of files against it.

``torch.save`` already computes a CRC-32 of every record while it writes (the zip format stores them in the
central directory at the end of the file). The manifest therefore costs no extra pass over the data: after a
checkpoint is durable, the writer reads the file's central directory (a few KiB at its end) and records its
size and the CRC-32 of that directory, which covers every record's CRC. Verification checks size and directory
against the manifest, then re-reads every record and checks its CRC — so a truncated, bit-flipped or swapped
file fails.

The manifest, ``.async_ckpt_manifest.json`` (hidden, so ``*`` globs and ``*.pt`` listings skip it), is itself
replaced atomically (temp file, fsync, rename, directory fsync) by the writer thread after each durable save or
removal.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any

from async_ckpt.pipeline.storage import FileStorage, is_temp_name

__all__ = ["MANIFEST_NAME", "VerifyResult", "describe", "read_manifest", "update_manifest", "verify"]

MANIFEST_NAME = ".async_ckpt_manifest.json"
_FORMAT = 1
_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_LOCAL_HEADER = b"PK\x03\x04"
_CHUNK = 1 << 20
_MISSING = "missing: no file at this path"
_NOT_A_ZIP = "not a readable zip archive (truncated, or torch.save did not write it)"
_MAX_RECORD_PROBLEMS = 3


def _central_directory(path: str) -> bytes:
    """The bytes of the zip central directory of ``path``.

    Raises:
        ValueError: the file has no complete central directory; the message does not repeat the path.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        tail_len = min(size, (1 << 16) + (1 << 10))
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        pos = tail.rfind(_EOCD)
        if pos < 0:
            raise ValueError(
                "no zip end-of-central-directory record at its end (the file is truncated, or torch.save did not "
                "write it)"
            )
        cd_size, cd_offset = struct.unpack("<II", tail[pos + 12 : pos + 20])
        loc = tail.rfind(_EOCD64_LOCATOR, 0, pos)
        if cd_offset == 0xFFFFFFFF or cd_size == 0xFFFFFFFF or loc >= 0:
            (eocd64_offset,) = struct.unpack("<Q", tail[loc + 8 : loc + 16])
            f.seek(eocd64_offset)
            rec = f.read(56)
            cd_size, cd_offset = struct.unpack("<QQ", rec[40:56])
        f.seek(cd_offset)
        data = f.read(cd_size)
        if len(data) != cd_size:
            raise ValueError(f"zip central directory cut short ({len(data)} of {cd_size} B): the file is truncated")
        return data


def describe(path: str) -> dict[str, Any]:
    """Size and central-directory checksum of a finished checkpoint file (reads only its end).

    Raises:
        ValueError: ``path`` is not a complete zip archive (the message names it).
    """
    try:
        directory = _central_directory(path)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return {"size": os.path.getsize(path), "cd_crc32": zlib.crc32(directory)}


def read_manifest(directory: str) -> dict[str, Any]:
    """The manifest of ``directory``, or an empty one if there is none or it cannot be parsed."""
    try:
        with open(os.path.join(directory, MANIFEST_NAME), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {"format": _FORMAT, "files": {}}
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return {"format": _FORMAT, "files": {}}
    return data


def update_manifest(storage: FileStorage, directory: str, added: dict[str, dict[str, Any]], removed: list[str]) -> None:
    """Add entries for ``added`` (file name -> info) and drop ``removed`` names, atomically and durably.

    Entries whose files no longer exist are dropped too, so the manifest never lists what is gone.
    """
    manifest = read_manifest(directory)
    files: dict[str, Any] = manifest["files"]
    for name in removed:
        files.pop(name, None)
    files.update(added)
    for name in [n for n in files if not os.path.exists(os.path.join(directory, n))]:
        del files[name]
    manifest["format"] = _FORMAT
    payload = json.dumps(manifest, indent=1, sort_keys=True, default=_plain).encode()
    storage.write_atomic(os.path.join(directory, MANIFEST_NAME), lambda f: f.write(payload))


def _plain(value: Any) -> Any:
    """JSON for NumPy / torch scalars (a key metric may be one), else the value's repr."""
    item = getattr(value, "item", None)
    return item() if callable(item) else repr(value)


@dataclass
class VerifyResult:
    """The outcome of verifying one file.

    Attributes:
        path: the file.
        ok: every check passed.
        checked: which checks ran (``"manifest"``: size and directory checksum; ``"records"``: every CRC).
        problems: what failed, in words.
        info: the manifest entry, if there was one.
    """

    path: str
    ok: bool
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def verify(path: str, *, records: bool = True) -> VerifyResult:
    """Check a checkpoint file against its directory's manifest and its own record CRCs.

    Args:
        path: a checkpoint file.
        records: also re-read every record and check its CRC-32 (reads the whole file).

    Returns:
        A :class:`VerifyResult`; ``ok`` is false if anything failed, and ``problems`` says what in words (which
        size, which record, which checksum). A file absent from the manifest is checked for record CRCs only
        (``checked`` says so). A path the manifest lists but where no file is fails with ``checked ==
        ["manifest"]``.
    """
    result = VerifyResult(path=path, ok=True)
    name = os.path.basename(path)
    if is_temp_name(name):
        return VerifyResult(path, False, problems=["temporary file of an unfinished write, not a checkpoint"])
    entry = read_manifest(os.path.dirname(path) or ".")["files"].get(name)
    if not os.path.isfile(path):
        if entry is None:
            return VerifyResult(path, False, problems=[_MISSING])
        return VerifyResult(path, False, ["manifest"], [f"listed in the manifest but {_MISSING}"], dict(entry))
    index_unreadable = False
    if entry is not None:
        result.info = dict(entry)
        result.checked.append("manifest")
        size, expected = os.path.getsize(path), entry.get("size")
        if size != expected:
            how = " (truncated)" if isinstance(expected, int) and size < expected else ""
            result.problems.append(f"size {size} B vs {expected} B in the manifest{how}")
        try:
            cd_crc32 = zlib.crc32(_central_directory(path))
        except OSError as exc:
            result.problems.append(_unreadable(exc))
            index_unreadable = True
        except ValueError as exc:
            result.problems.append(str(exc))
            index_unreadable = True
        else:
            if cd_crc32 != entry.get("cd_crc32"):
                result.problems.append(
                    "zip central directory (the index of its records) differs from the one the manifest recorded: "
                    "the file was replaced or rewritten after it was saved"
                )
    if records:
        result.checked.append("records")
        problems = _record_problems(path)
        if not (index_unreadable and problems[:1] in ([_NOT_A_ZIP], result.problems[-1:])):  # said once is enough
            result.problems.extend(problems)
    result.ok = not result.problems
    return result


def _record_problems(path: str) -> list[str]:
    """Re-read every record of the zip archive ``path``; say which fail their CRC-32 or cannot be read."""
    try:
        zf = zipfile.ZipFile(path)
    except OSError as exc:
        return [_unreadable(exc)]
    except (zipfile.BadZipFile, ValueError):
        return [_NOT_A_ZIP]
    problems: list[str] = []
    bad = 0
    with zf, open(path, "rb") as raw:
        for info in zf.infolist():
            try:
                crc = _record_crc32(zf, raw, info)
            except (OSError, zipfile.BadZipFile, ValueError, EOFError, zlib.error) as exc:
                problem = f"record {info.filename!r} cannot be read: {exc}"
            else:
                if crc == info.CRC:
                    continue
                problem = (
                    f"record {info.filename!r} fails its CRC-32 (0x{crc:08x} read, 0x{info.CRC:08x} in the zip "
                    "directory): its bytes changed after it was written"
                )
            bad += 1
            if bad <= _MAX_RECORD_PROBLEMS:
                problems.append(problem)
    if bad > _MAX_RECORD_PROBLEMS:
        problems.append(f"{bad - _MAX_RECORD_PROBLEMS} more records fail too")
    return problems


def _unreadable(exc: OSError) -> str:
    return f"the file cannot be read: {exc.strerror or exc}"


def _record_crc32(zf: zipfile.ZipFile, raw: Any, info: zipfile.ZipInfo) -> int:
    """The CRC-32 of the bytes of one record as they are on disk now.

    Stored records (all of torch.save's) are read straight from the file, since ``ZipFile.open`` raises on a bad
    CRC without saying what it read; compressed ones (other tools) are decompressed by ``zipfile``.
    """
    crc = 0
    if info.compress_type != zipfile.ZIP_STORED:
        with zf.open(info) as f:
            while chunk := f.read(_CHUNK):
                crc = zlib.crc32(chunk, crc)
        return crc
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) != 30 or header[:4] != _LOCAL_HEADER:
        raise ValueError(f"no local header at offset {info.header_offset}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    raw.seek(info.header_offset + 30 + name_len + extra_len)
    left = info.compress_size
    while left:
        chunk = raw.read(min(left, _CHUNK))
        if not chunk:
            raise ValueError(f"cut short: {info.compress_size - left} of {info.compress_size} B present")
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    return crc


def entry_for(path: str, info: dict[str, Any]) -> dict[str, Any]:
    """A manifest entry for the durable file ``path``: its description plus ``info`` and the time."""
    return {**describe(path), **info, "saved_at": time.time()}

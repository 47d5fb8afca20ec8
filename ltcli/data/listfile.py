"""ImageNet-LT / Places-LT list files: one `relative/path label` per line."""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

from ..errors import LtcliError
from ..io import check_regular_file

_LABEL = re.compile(r"-?[0-9]+")
_NEWLINE = re.compile(r"\r\n|\n|\r")


@dataclass(frozen=True)
class ListEntry:
    path: str     # as written in the file
    label: int
    lineno: int


def parse_list_text(text: str, name: str) -> list[ListEntry]:
    """Parse list-file text; blank lines are skipped, anything else must be `path label`.

    The path is everything before the last run of whitespace, so paths may contain spaces.
    `name` is the file name used in `name:line:` error messages."""
    entries = []
    # lines end at \n, \r\n or \r only: str.splitlines() would also break at \x0c, \x1c, \x85,
    # U+2028 ..., which are legal in file names, and shift every line number after them
    lines = _NEWLINE.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip().lstrip("\ufeff")
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not _LABEL.fullmatch(parts[1]):
            raise LtcliError(f"{name}:{lineno}: expected 'path label', got {line[:80]!r}")
        label = int(parts[1])
        if label < 0:
            raise LtcliError(f"{name}:{lineno}: label {label} is negative")
        if "\x00" in parts[0]:  # no file system accepts it; say where it is, not what open() thinks
            raise LtcliError(f"{name}:{lineno}: path contains a NUL byte")
        entries.append(ListEntry(parts[0].strip(), label, lineno))
    return entries


def read_list_file(path: str) -> list[ListEntry]:
    if os.path.isdir(path):
        raise LtcliError(f"{path}: is a directory, expected a list file")
    check_regular_file(path, "list file")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise LtcliError(f"{path}: list file not found") from None
    except IsADirectoryError:
        raise LtcliError(f"{path}: is a directory, expected a list file") from None
    except OSError as exc:
        raise LtcliError(f"{path}: cannot read list file ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LtcliError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    entries = parse_list_text(text, path)
    if not entries:
        raise LtcliError(f"{path}: list file holds no images")
    return entries


def resolve_entry(entry: ListEntry, root: str, list_name: str, allow_outside_root: bool) -> tuple[str, str]:
    """(key, absolute path) of a list entry; paths escaping ROOT are refused unless allowed.

    The key is the path relative to ROOT in posix form: it is what selection and the
    fingerprint hash, so moving the data root changes neither."""
    root_abs = os.path.abspath(root)
    p = entry.path
    if os.path.isabs(p):
        full = os.path.normpath(p)
        key = os.path.relpath(full, root_abs).replace(os.sep, "/")
    else:
        key = posixpath.normpath(p)
        full = os.path.normpath(os.path.join(root_abs, key))
    if not allow_outside_root:
        real, real_root = os.path.realpath(full), os.path.realpath(root_abs)
        through_link = not (real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep))
        if key == ".." or key.startswith("../") or through_link:
            how = " through a symlink" if not (key == ".." or key.startswith("../")) else ""
            raise LtcliError(
                f"{list_name}:{entry.lineno}: path {entry.path!r} lies outside the data root {root}{how} "
                "(use --allow-outside-root to permit it)"
            )
    return key, full

"""Reading the user's files: a path that must be a regular file, and JSON.

Every command reads its inputs through these (and :func:`lift3d.utils.io.load_torch` for checkpoints,
:func:`lift3d.config_files.read_yaml` for configs, :func:`lift3d.utils.images.open_image` for images), so a
path that exists but is not a regular file is named for what it is (a folder, a named pipe, a symbolic-link
loop, ...) instead of "not found", and a file that cannot be read ends as one line naming it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any, Optional

from lift3d.errors import UserError


def file_kind(path: str) -> Optional[str]:
    """None when ``path`` is a regular file (after symbolic links), else what it is: ``"not found"``,
    ``"a directory (a folder), not a file"``, ``"a named pipe (FIFO), not a file"``, ``"a symbolic-link loop"``,
    ``"a broken symbolic link (to ...)"``, ..."""
    if not path:
        return "not found (an empty path)"
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic-link loop"
        if e.errno == errno.ENOENT:
            return f"a broken symbolic link (to {os.readlink(path)})" if os.path.islink(path) else "not found"
        if e.errno == errno.ENOTDIR:
            return "not found (a part of its path is a file, not a folder)"
        if e.errno == errno.EACCES:
            return "not accessible (permission denied on a folder of its path)"
        return f"not accessible ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    for test, what in ((stat.S_ISDIR, "a directory (a folder), not a file"),
                       (stat.S_ISFIFO, "a named pipe (FIFO), not a file"), (stat.S_ISSOCK, "a socket, not a file"),
                       (stat.S_ISCHR, "a character device, not a file"), (stat.S_ISBLK, "a block device, not a file")):
        if test(mode):
            return what
    return "not a regular file"


def require_file(path: str, what: str = "file", hint: str = "") -> str:
    """``path`` when it is a regular file this process can read; else :class:`UserError` in one line:
    ``{what} not found: PATH; HINT`` or ``{what} PATH is a folder; HINT`` (a FIFO, a link loop, ...)."""
    kind = file_kind(path)
    tail = f"; {hint}" if hint else ""
    if not path:
        raise UserError(f"no {what} given (an empty path){tail}")
    if kind is not None and kind.startswith("not found"):
        raise UserError(f"{what} not found: {path}{kind[len('not found'):]}{tail}")
    if kind is not None:
        raise UserError(f"{what} {path} is {kind}{tail}")
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read {what} {path}: permission denied{tail}")
    return path


def read_json(path: str, what: str = "JSON file", hint: str = "") -> Any:
    """The JSON in ``path`` (a regular file: :func:`require_file`); :class:`UserError` in one line naming the file
    and where it stops being JSON."""
    require_file(path, what, hint)
    tail = f"; {hint}" if hint else ""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg
        raise UserError(f"cannot read {what} {path}: not valid JSON at line {e.lineno}, column {e.colno} ({msg})"
                        f"{tail}") from None
    except UnicodeDecodeError:
        raise UserError(f"cannot read {what} {path}: not UTF-8 text (a binary file?){tail}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}{tail}") from None


def read_json_object(path: str, what: str = "JSON file", hint: str = "", keys: tuple = ()) -> dict:
    """:func:`read_json` of a file that must hold a JSON object with ``keys``."""
    data = read_json(path, what, hint)
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if not isinstance(data, dict) or missing:
        found = "not a JSON object" if not isinstance(data, dict) else f"no {', '.join(repr(k) for k in missing)}"
        raise UserError(f"{what} {path} is not what lift3d expects ({found}){'; ' + hint if hint else ''}")
    return data

"""Secrets that the embedded default makes for itself and keeps in the data dir (mode 0600), and the data dir
itself kept its owner's only."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def load_or_create(path: Path, prefix: str = "", nbytes: int = 32) -> str:
    """The secret stored at `path`, or a new random one written there atomically."""
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = prefix + secrets.token_urlsafe(nbytes)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    try:
        os.link(tmp, path)  # fails if another process won the race; then use theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_text().strip()


def write_private(path: Path, value: str) -> None:
    """Write `value` to `path` (mode 0600), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.replace(tmp, path)


def secure_data_dir(data_dir: Path) -> None:
    """The data dir and everything in it readable by its owner only (secrets, the store and its WAL, Redis's
    AOF, logs). New files are made so by the umask every `pairloop` command sets (deploy/cli)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)
    for root, dirs, files in os.walk(data_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                mode = os.lstat(path).st_mode
                if mode & 0o077 and not os.path.islink(path):
                    os.chmod(path, mode & 0o7700)

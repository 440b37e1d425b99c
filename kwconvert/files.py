"""Files written whole or not at all: what export and the HTML report share (a save is a
directory, staged the same way in ``io``).

A file is written to a hidden sibling and renamed onto its name only once complete, so a
run killed half-way leaves the previous file, or none, never half of one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_file", "umask"]


def umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(target: Path, suffix: str = "") -> Iterator[Path]:
    """A hidden sibling of ``target`` to write; renamed onto ``target`` only if the block succeeds.

    Missing parent directories are made, and removed again if anything fails.
    """
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory; give a file name to write to")
    made = [parent for parent in reversed(target.parents) if not parent.exists()]
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", suffix=suffix, dir=target.parent)
        os.close(handle)
        staging = Path(name)
        yield staging
        os.chmod(staging, 0o666 & ~umask())  # mkstemp's file is 0600; give what open() would
        os.replace(staging, target)
    except BaseException:
        if staging is not None:
            staging.unlink(missing_ok=True)
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise

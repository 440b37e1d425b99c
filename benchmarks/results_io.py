"""Shared by the benchmark scripts: write a results JSON atomically."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json(data: dict, path: Path) -> None:
    """Write ``path`` via a temporary sibling and a rename, with the umask's permissions,
    so an interrupted benchmark never leaves a half-written results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as tmp:
        json.dump(data, tmp, indent=2)
        tmp.write("\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp.name, 0o666 & ~umask)
    os.replace(tmp.name, path)

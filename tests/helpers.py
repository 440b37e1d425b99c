"""Helpers shared by the command-line tests (test_cli.py, test_bad_input.py, test_models.py)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path


def one_line(text: str) -> str:
    """The only non-blank line of ``text`` (a command's stderr), which holds no traceback."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def installed_script() -> str:
    """The ``kwconvert`` console script of this environment."""
    script = Path(sys.executable).parent / "kwconvert"
    return str(script) if script.exists() else shutil.which("kwconvert")


class CodePayload:
    """Unpickling this creates ``marker``: a loader that runs it has executed the file's code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))

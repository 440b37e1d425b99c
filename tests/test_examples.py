"""The scripts in examples/ run as documented."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_finetune_example_converts_trains_saves_loads_and_exports(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "tiny-kw"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "finetune_converted.py"), "--model", "tests.test_export:tiny_cnn",
         "--input-size", "3,12,12", "--steps", "4", "--batch-size", "8", "--budget", "1/2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert "step 4/4" in result.stdout
    assert (out / "model.safetensors").is_file() and out.with_suffix(".onnx").is_file()
    loaded_diff = float(re.search(r"loaded back, max \|diff\| (\S+)", result.stdout).group(1))
    onnx_diff = float(re.search(r"onnxruntime: max \|diff\| (\S+)", result.stdout).group(1))
    assert loaded_diff == 0.0 and onnx_diff <= 1e-4

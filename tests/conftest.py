import sys
from pathlib import Path

import torch

# The repository root on sys.path lets tests name callables like "tests.test_models:tiny_model".
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)

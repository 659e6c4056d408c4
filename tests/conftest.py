import os
import sys

import pytest
import torch

# Tests import the flat top-level modules (model.py, kvshare.py, ...) from the repo root and
# the research tools (tools/experiment.py, tools/mmlu.py, ...) from tools/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "tools"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

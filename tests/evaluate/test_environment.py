"""What every eval.json / report.html records about the software and device behind its numbers."""

import importlib.metadata
import json

import numpy as np
import timm
import torch
import torchvision

from balpoe.evaluate.build import environment
from balpoe.runtime.device import device_name


def test_environment_names_the_versions_and_the_device():
    env = environment(torch.device("cpu"), amp=False)
    assert env["torch"] == torch.__version__
    assert env["torchvision"] == torchvision.__version__
    assert env["timm"] == timm.__version__
    assert env["numpy"] == np.__version__
    assert env["balpoe"] == importlib.metadata.version("balpoe")
    assert env["cuda"] == torch.version.cuda            # None on a CPU-only build of torch
    assert env["cudnn"] == (torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    assert env["device"] == device_name(torch.device("cpu")) and env["device"]
    assert env["dtype"] == "float32"
    assert json.loads(json.dumps(env)) == env           # plain JSON, as eval.json stores it

"""pyiqa 0.1.16's own `calculate_niqe` (`pyiqa/archs/niqe_arch.py`), imported without
running `pyiqa/__init__.py` (which pulls cv2, timm, transformers...).

pyiqa's package modules are stood in for while importing, and `arch_util` (needed there
only for a download URL helper, and importing torchvision) is replaced by that one
helper. sys.modules is restored afterwards, so no stand-in stays visible to other code.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path


def pyiqa_calculate_niqe(root: Path):
    """`calculate_niqe` of the pyiqa package installed in folder `root`."""
    saved = {k: v for k, v in sys.modules.items() if k == "pyiqa" or k.startswith("pyiqa.")}
    for k in saved:
        del sys.modules[k]
    try:
        for name in ("pyiqa", "pyiqa.archs", "pyiqa.utils"):
            package = types.ModuleType(name)
            package.__path__ = [str(Path(root).joinpath(*name.split(".")[1:]))]
            sys.modules[name] = package
        arch_util = types.ModuleType("pyiqa.archs.arch_util")
        arch_util.get_url_from_name = lambda name: name
        sys.modules[arch_util.__name__] = arch_util
        module = importlib.import_module("pyiqa.archs.niqe_arch")
    finally:
        for k in [k for k in sys.modules if k == "pyiqa" or k.startswith("pyiqa.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return module.calculate_niqe

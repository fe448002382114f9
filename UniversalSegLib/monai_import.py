"""MONAI, imported without torchvision: import this module before the first ``monai`` import.

Importing any part of MONAI imports all of it, and a few of its modules (torchvision-based networks, the
detection FPN, a perceptual loss) import torchvision eagerly when it is installed (it comes with the
``clip`` extra), which in turn loads PyTorch's compiler (``torch._dynamo``). UniversalSeg uses none of
them; together they cost about 160 MB of resident memory in every process that segments (measured with
``import monai`` alone: 817 MB with torchvision, 660 MB without, PyTorch and OpenVINO loaded). So MONAI is
imported with torchvision hidden, and those modules record it as missing, as on an install without it.
torchvision itself stays importable afterwards (open_clip needs it for text embeddings), but MONAI's
torchvision-based features (``TorchVisionFCModel`` and the like) stay unavailable in that process; a program
that needs them imports torchvision before UniversalSegLib, and this module then changes nothing.
"""
from __future__ import annotations

import sys


def _import_monai_without_torchvision() -> None:
    if "monai" in sys.modules or "torchvision" in sys.modules:
        return  # imported already: nothing left to save
    sys.modules["torchvision"] = None  # `import torchvision` raises ImportError, which MONAI's optional_import takes
    try:
        import monai  # noqa: F401
    finally:
        if "torchvision" in sys.modules and sys.modules["torchvision"] is None:
            del sys.modules["torchvision"]


_import_monai_without_torchvision()

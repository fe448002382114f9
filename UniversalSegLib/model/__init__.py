"""The Universal Model network: the backbones registered in :mod:`UniversalSegLib.backbones` and the
text-driven head."""
from .. import monai_import  # noqa: F401  (before the modules below: MONAI without torchvision)
from .swin_unetr import OfficialPatchMerging, SwinUNETRBackbone
from .unet import BatchStatNorm3d, UNet3DBackbone
from .universal_model import HEAD_PARAMS, ModelConfig, UniversalModel, apply_dynamic_head

__all__ = [
    "HEAD_PARAMS", "ModelConfig", "UniversalModel", "apply_dynamic_head",
    "SwinUNETRBackbone", "OfficialPatchMerging", "UNet3DBackbone", "BatchStatNorm3d",
]

"""Universal Model: Swin UNETR / U-Net backbones and the text-driven head."""
from .swin_unetr import OfficialPatchMerging, SwinUNETRBackbone
from .unet import BatchStatNorm3d, UNet3DBackbone
from .universal_model import BACKBONES, HEAD_PARAMS, ModelConfig, UniversalModel, apply_dynamic_head

__all__ = [
    "BACKBONES", "HEAD_PARAMS", "ModelConfig", "UniversalModel", "apply_dynamic_head",
    "SwinUNETRBackbone", "OfficialPatchMerging", "UNet3DBackbone", "BatchStatNorm3d",
]

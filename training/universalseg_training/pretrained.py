"""Initialise the backbone from self-supervised / pretrained weights (the official ``--pretrain``).

Two public files are meant, as in the official training script:

* Swin UNETR: MONAI's self-supervised Swin UNETR weights (e.g. ``swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt``,
  ``{"state_dict": {...}}`` with keys ``swinViT.*``, ``encoder*``, ``decoder*``, ``out.*``): every entry except
  the segmentation output layer ``out.*`` is copied into the backbone;
* U-Net: Models Genesis ``Genesis_Chest_CT.pt`` (``{"state_dict": {"module.down_tr64...": ...}}``): every
  entry except the output layer ``out_tr`` is copied into the backbone.

Only the backbone is initialised; the class-conditioned head and the label embeddings start as for a
fresh model. Every copied entry must exist in the backbone with the same shape (a file of the other
backbone, or of another width, is an error that names the first mismatching key).
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["PretrainedWeightsError", "load_pretrained_backbone"]


class PretrainedWeightsError(ValueError):
    """The pretrained-backbone file cannot initialise this model's backbone."""


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained_backbone {path} does not exist; give the path of the self-supervised "
                                     "Swin UNETR weights or of Models Genesis' Genesis_Chest_CT.pt")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickled code or a damaged file
        raise PretrainedWeightsError(f"pretrained_backbone {path} cannot be read as a weights file: {error}") from None
    for key in ("state_dict", "net", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise PretrainedWeightsError(f"pretrained_backbone {path} holds no state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in data.items()}


def _is_output_layer(key: str, backbone: str) -> bool:
    if backbone == "unet":
        return key.startswith("out_tr")
    return key.startswith("out.")  # the SwinUNETR segmentation head; proj_out etc. belong to the backbone


def load_pretrained_backbone(model: torch.nn.Module, path: str | Path, backbone: str) -> dict:
    """Copy the backbone weights of ``path`` into ``model.backbone``; returns what was loaded (for the logs)."""
    path = Path(path).expanduser()
    weights = _read(path)
    target = model.backbone.state_dict()
    chosen = {k: v for k, v in weights.items() if not _is_output_layer(k, backbone)}
    # MONAI's SwinUNETR and the flat official layout prefix nothing; a wrapped copy may prefix 'backbone.'.
    chosen = {(k[len("backbone."):] if k.startswith("backbone.") else k): v for k, v in chosen.items()}
    unknown = [k for k in chosen if k not in target]
    if unknown:
        raise PretrainedWeightsError(
            f"pretrained_backbone {path}: {len(unknown)} of its {len(chosen)} entries are not weights of the {backbone} "
            f"backbone (first: {unknown[0]!r}). Is it the file for the other backbone? Swin UNETR takes MONAI's "
            "self-supervised Swin UNETR weights, unet takes Models Genesis' Genesis_Chest_CT.pt.")
    wrong = [k for k, v in chosen.items() if tuple(v.shape) != tuple(target[k].shape)]
    if wrong:
        raise PretrainedWeightsError(
            f"pretrained_backbone {path}: {wrong[0]} has shape {tuple(chosen[wrong[0]].shape)} in the file but "
            f"{tuple(target[wrong[0]].shape)} in the model; pretrained weights fit model_size: official only.")
    if not chosen:
        raise PretrainedWeightsError(f"pretrained_backbone {path} holds no backbone weights")
    target.update({k: v.to(target[k].dtype) for k, v in chosen.items()})
    model.backbone.load_state_dict(target)
    return {"file": str(path), "entries_loaded": len(chosen), "backbone_entries": len(target)}

"""Masked BCE + Dice loss: only the classes annotated in each case contribute (the official partial-label loss).

For every (batch element, class) pair with ``annotated[b, k]`` true, the loss is the voxel-mean binary
cross-entropy of the logits plus ``1 - Dice`` of the sigmoid probabilities with +1 smoothing,
``dice = 2 sum(p t) / (sum(p) + sum(t) + 1)``. Both terms are averaged over the annotated pairs, so a class a
case does not annotate sends no gradient at all through that case (masked back-propagation); it is neither
background nor foreground there.

``dice="slice"`` reproduces the paper's original Dice (commit b6ecb7e): each crop is cut into slices along
its first spatial axis, a Dice with +1 smoothing is computed per slice and the slices are averaged. The
HEAD version of the official code crashes instead. ``dice="volume"`` (default) is one Dice per
crop.

``naive_targets`` builds the baseline the paper argues against: every unannotated class is treated as
background (target 0, supervised everywhere).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["LossParts", "masked_bce_dice_loss", "naive_targets", "DICE_MODES"]

DICE_MODES = ("volume", "slice")


@dataclass
class LossParts:
    """The loss and its two terms (detached), plus how many (case, class) pairs were supervised."""

    loss: torch.Tensor
    bce: float
    dice: float
    pairs: int


def _dice_loss(probabilities: torch.Tensor, targets: torch.Tensor, mode: str, smooth: float) -> torch.Tensor:
    """``1 - dice`` per (batch, class): (B, K, *spatial) -> (B, K)."""
    b, k = probabilities.shape[:2]
    if mode == "slice":
        # (B, K, D, rest): one Dice per slice along the first spatial axis, then the slice mean.
        p = probabilities.reshape(b, k, probabilities.shape[2], -1)
        t = targets.reshape(b, k, targets.shape[2], -1)
        dice = (2 * (p * t).sum(-1)) / (p.sum(-1) + t.sum(-1) + smooth)
        return 1 - dice.mean(-1)
    p = probabilities.reshape(b, k, -1)
    t = targets.reshape(b, k, -1)
    return 1 - (2 * (p * t).sum(-1)) / (p.sum(-1) + t.sum(-1) + smooth)


def masked_bce_dice_loss(logits: torch.Tensor, targets: torch.Tensor, annotated: torch.Tensor,
                         dice: str = "volume", smooth: float = 1.0) -> LossParts:
    """BCE + Dice averaged over the annotated (case, class) pairs.

    Args:
        logits: (B, K, *spatial) raw network outputs.
        targets: (B, K, *spatial) 0/1 targets (any dtype); values of unannotated pairs are ignored.
        annotated: (B, K) bool, which pairs are supervised.
        dice: ``"volume"`` or ``"slice"`` (see module docstring).
        smooth: Dice smoothing term (the official +1).
    """
    if dice not in DICE_MODES:
        raise ValueError(f"dice must be one of {DICE_MODES}, got {dice!r}")
    if logits.shape != targets.shape or annotated.shape != logits.shape[:2]:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, "
                         f"annotated {tuple(annotated.shape)}")
    logits = logits.float()  # the loss in float32 even under bf16 autocast
    targets = targets.to(logits.dtype)
    mask = annotated.to(logits.device, torch.bool)
    pairs = int(mask.sum())
    if pairs == 0:
        zero = logits.sum() * 0.0  # keeps the graph (DDP needs every rank to call backward)
        return LossParts(zero, 0.0, 0.0, 0)
    spatial = tuple(range(2, logits.dim()))
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=spatial)  # (B, K)
    dice_loss = _dice_loss(torch.sigmoid(logits), targets, dice, smooth)
    weights = mask.to(logits.dtype)
    bce_mean = (bce * weights).sum() / pairs
    dice_mean = (dice_loss * weights).sum() / pairs
    return LossParts(bce_mean + dice_mean, float(bce_mean.detach()), float(dice_mean.detach()), pairs)


def naive_targets(targets: torch.Tensor, annotated: torch.Tensor, supervised: torch.Tensor | None = None):
    """(targets, annotated) of the naive baseline: unannotated classes become background everywhere.

    ``supervised`` (K,) bool limits the classes (default: all channels).
    """
    b, k = annotated.shape
    flags = torch.ones_like(annotated, dtype=torch.bool)
    if supervised is not None:
        flags &= supervised.to(annotated.device, torch.bool)[None].expand(b, k)
    cleared = targets * annotated.to(targets.dtype)[(...,) + (None,) * (targets.dim() - 2)]
    return cleared, flags

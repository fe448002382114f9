"""Memory-lean inference forms of the blocks that run at full window resolution.

At 96^3 a 48-channel feature map is 170 MB, and MONAI's residual blocks keep several of them alive at
once (convolution output, a separate normalised copy, the concatenated skip input, the residual), about
0.9 GB at the last decoder stage. Without autograd nothing needs those intermediates, so these forms
normalise in place and drop every input as soon as its last reader has run. The arithmetic is the
blocks' own (instance/group normalisation as ``(x - mean) / sqrt(var + eps)`` with the biased variance);
results equal the modules' within float rounding. Training keeps the modules' ``forward``.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["basic_block", "group_norm_", "instance_norm_", "res_block", "up_block"]


def instance_norm_(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Apply ``norm`` (an InstanceNorm3d without running statistics) to ``x`` in place."""
    if not isinstance(norm, nn.InstanceNorm3d) or norm.track_running_stats or x.dtype != torch.float32:
        # Another kind of norm, or reduced precision (autocast runs the module in float32): the module.
        return norm(x)
    var, mean = torch.var_mean(x, dim=(2, 3, 4), unbiased=False, keepdim=True)
    x.sub_(mean).mul_(torch.rsqrt(var.add_(norm.eps)))
    if norm.affine:
        shape = (1, -1, 1, 1, 1)
        x.mul_(norm.weight.reshape(shape)).add_(norm.bias.reshape(shape))
    return x


def group_norm_(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """Apply a GroupNorm to a (B, C, D, H, W) tensor in place, one group at a time (any memory layout)."""
    if x.dtype != torch.float32:
        return norm(x)  # reduced precision: autocast runs the module in float32
    per_group = x.shape[1] // norm.num_groups
    for g in range(norm.num_groups):
        part = x[:, g * per_group:(g + 1) * per_group]
        var, mean = torch.var_mean(part, dim=(1, 2, 3, 4), unbiased=False, keepdim=True)
        part.sub_(mean).mul_(torch.rsqrt(var.add_(norm.eps)))
    if norm.affine:
        shape = (1, -1, 1, 1, 1)
        x.mul_(norm.weight.reshape(shape)).add_(norm.bias.reshape(shape))
    return x


def res_block(block: nn.Module, held: list[torch.Tensor]) -> torch.Tensor:
    """MONAI ``UnetResBlock`` forward (conv-norm-lrelu-conv-norm + residual, lrelu) without autograd.

    ``held`` is a one-element list holding the input; it is emptied, so the input is freed as soon as
    the residual branch has read it (when the caller keeps no other reference).
    """
    inp = held.pop()
    out = instance_norm_(block.conv1(inp), block.norm1)
    out = block.lrelu(out)  # in place (MONAI builds it with inplace=True)
    if hasattr(block, "conv3"):
        residual = block.conv3(inp)
        del inp
        if hasattr(block, "norm3"):
            residual = instance_norm_(residual, block.norm3)
    else:
        residual = inp
        del inp
    result = instance_norm_(block.conv2(out), block.norm2)
    del out
    result += residual
    del residual
    return block.lrelu(result)


def basic_block(block: nn.Module, held: list[torch.Tensor]) -> torch.Tensor:
    """MONAI ``UnetrBasicBlock`` (a residual block in ``block.layer``) without autograd."""
    return res_block(block.layer, held)


def up_block(block: nn.Module, inp: torch.Tensor, skip_held: list[torch.Tensor]) -> torch.Tensor:
    """MONAI ``UnetrUpBlock``: transposed convolution, concatenation with the skip, residual block.

    The skip is taken out of ``skip_held`` and freed once concatenated.
    """
    up = block.transp_conv(inp)
    joined = torch.cat((up, skip_held.pop()), dim=1)
    del up
    return res_block(block.conv_block, [joined])

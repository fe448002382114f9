"""3-D U-Net backbone of the Universal Model (the Models Genesis U-Net, without its output layer).

Keys, shapes and computation equal the official ``model/Unet.py``. Its normalisation layer is a
BatchNorm that *always* normalises with the statistics of the current batch, in eval mode too, and
never uses its running statistics for the output. The official inference runs one 96^3 window per
batch, where that is exactly instance normalisation with the BatchNorm's affine parameters; we compute
it per sample (:class:`BatchStatNorm3d`), so a window's output never depends on what else is in the
batch and the stored running statistics are never mutated at inference (the official layer updates them
in place on every call).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BatchStatNorm3d", "UNet3DBackbone"]


class BatchStatNorm3d(nn.BatchNorm3d):
    """BatchNorm3d state (weight, bias, running stats) with per-sample, batch-statistics normalisation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Biased variance and eps as F.batch_norm(training=True) on a batch of one sample.
        return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


class _ConvNormReLU(nn.Module):
    """Conv3d(3x3x3, bias) -> BatchStatNorm3d -> ReLU (the official ``LUConv``; keys conv1/bn1)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.bn1 = BatchStatNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class _Down(nn.Module):
    """Two conv layers (to ``base*2^depth`` then ``2*base*2^depth`` channels), optionally max-pooled."""

    def __init__(self, cin: int, depth: int, base: int, pool: bool) -> None:
        super().__init__()
        mid = base * 2**depth
        self.ops = nn.Sequential(_ConvNormReLU(cin, mid), _ConvNormReLU(mid, 2 * mid))
        self.pool = pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return (F.max_pool3d(skip, 2) if self.pool else skip), skip


class _Up(nn.Module):
    """Transposed conv x2 (bias), concat ``[upsampled, skip]``, two conv layers to ``base*2^(depth+1)``."""

    def __init__(self, cin: int, depth: int, base: int) -> None:
        super().__init__()
        cout = base * 2 ** (depth + 1)
        self.up_conv = nn.ConvTranspose3d(cin, cin, kernel_size=2, stride=2)
        self.ops = nn.Sequential(_ConvNormReLU(cin + cin // 2, cout), _ConvNormReLU(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class UNet3DBackbone(nn.Module):
    """Returns ``(deepest feature, decoder output)``: ``(B, 16*base, s/8)`` and ``(B, 2*base, s)``.

    ``base=32`` is the official size (512 channels at 12^3, 64 channels at 96^3 for a 96^3 input).
    Spatial sizes must be multiples of 8.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32) -> None:
        super().__init__()
        b = base_channels
        self.down_tr64 = _Down(in_channels, 0, b, pool=True)
        self.down_tr128 = _Down(2 * b, 1, b, pool=True)
        self.down_tr256 = _Down(4 * b, 2, b, pool=True)
        self.down_tr512 = _Down(8 * b, 3, b, pool=False)
        self.up_tr256 = _Up(16 * b, 2, b)
        self.up_tr128 = _Up(8 * b, 1, b)
        self.up_tr64 = _Up(4 * b, 0, b)
        self.deep_channels = 16 * b
        self.out_channels = 2 * b

    @classmethod
    def kwargs_from_state(cls, state) -> dict:
        """``base_channels`` of the backbone that produced ``state`` (model key names)."""
        return {"base_channels": int(state["backbone.down_tr64.ops.0.conv1.weight"].shape[0])}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x64, skip64 = self.down_tr64(x)
        x128, skip128 = self.down_tr128(x64)
        x256, skip256 = self.down_tr256(x128)
        deepest, _ = self.down_tr512(x256)
        up = self.up_tr256(deepest, skip256)
        up = self.up_tr128(up, skip128)
        out = self.up_tr64(up, skip64)
        return deepest, out

"""Swin UNETR backbone of the Universal Model, assembled from MONAI blocks.

The state-dict keys, shapes and the forward computation equal the official model
(`model/SwinUNETR.py` of CLIP-Driven-Universal-Model), which is MONAI 0.9's SwinUNETR without its
output block. Two quirks of that version are reproduced on purpose, because the released weights were
trained with them:

* Patch merging concatenates the eight strided sub-grids in a buggy order (see
  :class:`OfficialPatchMerging`); current MONAI fixed the order, so its ``"merging"`` mode cannot be
  used as is.
* At the deepest stage (6^3 tokens for a 96^3 input) the attention window shrinks to 6^3, but the
  relative-position bias is looked up with the top-left ``[:216, :216]`` block of the 7^3 index table
  instead of a 6^3 table. MONAI's ``WindowAttention`` still does exactly this, so we inherit it.

At inference the window attention runs as :class:`ChunkedWindowAttention`: the same arithmetic through
PyTorch's fused ``scaled_dot_product_attention``, a bounded number of windows at a time. The plain
softmax path materialises ``windows x heads x 343 x 343`` scores several times over (about 0.5 GB each
at the first stage of a 96^3 window); the chunked one never holds more than ``_ATTENTION_CHUNK_BYTES``
of bias and runs faster on CPU. Training (autograd on) keeps MONAI's own path.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetrBasicBlock, UnetrUpBlock
from monai.networks.nets.swin_unetr import PatchMergingV2, SwinTransformer, WindowAttention
from torch import nn

from . import low_memory

__all__ = ["ChunkedWindowAttention", "OfficialPatchMerging", "SwinUNETRBackbone"]

# Score added within a shift region instead of the shift mask's -100 across regions, in traced graphs.
_REGION_OFFSET = 30.0
# Additive attention bias (relative position + shift mask) held at once, per chunk of windows.
_ATTENTION_CHUNK_BYTES = 64 * 2**20

# (d, h, w) offsets of the eight sub-grids in the order the official code concatenates them.
# (0,1,0) and (0,0,1) appear twice, (1,1,0) and (0,1,1) never: MONAI 0.9's "merging" bug.
_OFFICIAL_MERGE_OFFSETS = (
    (0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1),
)


class OfficialPatchMerging(PatchMergingV2):
    """3-D patch merging (LayerNorm(8C) -> Linear(8C, 2C)) with the official sub-grid order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in _OFFICIAL_MERGE_OFFSETS], dim=-1)
        return self.reduction(self.norm(x))


class ChunkedWindowAttention(WindowAttention):
    """MONAI's window attention; without autograd, evaluated by fused attention over chunks of windows.

    Same parameters and state-dict keys as :class:`monai.networks.nets.swin_unetr.WindowAttention`; the
    result equals its softmax path up to float rounding (summation order).
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.jit.is_scripting():
            return super().forward(x, mask)
        windows, n, c = x.shape
        heads = self.num_heads
        index = self.relative_position_index[:n, :n].reshape(-1)  # the [:n, :n] quirk, as MONAI
        position_bias = self.relative_position_bias_table[index].reshape(n, n, heads).permute(2, 0, 1)
        if torch.jit.is_tracing():
            return self._attend_all(x, mask, position_bias)
        chunk = max(1, _ATTENTION_CHUNK_BYTES // (heads * n * n * x.element_size()))
        out = torch.empty_like(x)
        for start in range(0, windows, chunk):
            stop = min(start + chunk, windows)
            qkv = self.qkv(x[start:stop]).reshape(stop - start, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
            if mask is None:
                bias = position_bias[None]
            else:
                # Windows are laid out sample-major, so window i uses shift mask i % (windows per sample).
                rows = torch.arange(start, stop, device=x.device) % mask.shape[0]
                bias = position_bias[None] + mask[rows][:, None]
            attended = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias.to(qkv.dtype),
                                                      scale=self.scale)
            out[start:stop] = self.proj(attended.transpose(1, 2).reshape(stop - start, n, c))
        return out

    def _attend_all(self, x: torch.Tensor, mask: torch.Tensor | None, position_bias: torch.Tensor) -> torch.Tensor:
        """The same attention as one fused call over all windows, for graph exporters (OpenVINO traces the
        model): no chunk loop writing into slices of an output, which traced graphs cannot express.

        The shift mask (-100 between tokens of different regions of a shifted window) does not enter as an
        additive (windows x heads x n x n) mask: an exporter folds that into a constant of that size (0.5 GB
        at the first stage of a 96^3 window). Instead queries and keys get a one-hot of their token's region,
        scaled so that the score of two tokens of one region rises by ``_REGION_OFFSET``. Softmax ignores a
        shift shared by a whole row, so this is adding ``-_REGION_OFFSET`` across regions; weights across
        regions are then e^-30 instead of e^-100, both far below float32 resolution next to the others.
        """
        windows, n, c = x.shape
        heads, dim = self.num_heads, c // self.num_heads
        qkv = self.qkv(x).reshape(windows, n, 3, heads, dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if mask is None:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias[None].to(q.dtype),
                                                      scale=self.scale)
        else:
            # Windows are laid out sample-major: (samples, windows per sample, heads, n, head size).
            shape = (windows // mask.shape[0], mask.shape[0], heads, n, dim)
            region = _region_one_hot(mask).to(q) * (_REGION_OFFSET / self.scale) ** 0.5
            region = region[None, :, None].expand(*shape[:4], region.shape[-1])
            q = torch.cat([q.reshape(shape), region], dim=-1)
            k = torch.cat([k.reshape(shape), region], dim=-1)
            bias = position_bias[None, None].to(q.dtype)
            attended = F.scaled_dot_product_attention(q, k, v.reshape(shape), attn_mask=bias, scale=self.scale)
        return self.proj(attended.reshape(windows, heads, n, dim).transpose(1, 2).reshape(windows, n, c))


def _region_one_hot(mask: torch.Tensor) -> torch.Tensor:
    """(windows, n, regions) float one-hot of each token's region, from a Swin shift mask (0 within a region,
    negative across). Computed in numpy: the mask depends only on the window layout, so a trace keeps the
    result as a small constant."""
    same = mask.detach().cpu().numpy() == 0
    first = same.argmax(axis=2)  # a region is named by its first token
    is_first = first == np.arange(same.shape[1])[None]
    region = np.take_along_axis(np.cumsum(is_first, axis=1), first, axis=1) - 1
    return torch.from_numpy(np.eye(int(region.max()) + 1, dtype=np.float32)[region])


class SwinUNETRBackbone(nn.Module):
    """Swin transformer encoder + residual CNN decoder; returns ``(deepest feature, decoder output)``.

    For a ``(B, 1, 96, 96, 96)`` input and ``feature_size=48`` the deepest feature is ``(B, 768, 3, 3, 3)``
    and the decoder output ``(B, 48, 96, 96, 96)``. Spatial sizes must be multiples of 32.
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        norm_name: str = "instance",
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        fs = feature_size
        self.swinViT = SwinTransformer(
            in_chans=in_channels,
            embed_dim=fs,
            window_size=(window_size,) * 3,
            patch_size=(2, 2, 2),
            depths=depths,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=0.0,
            norm_layer=nn.LayerNorm,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
            downsample=OfficialPatchMerging,
        )
        for module in self.swinViT.modules():
            if type(module) is WindowAttention:
                module.__class__ = ChunkedWindowAttention  # same parameters, only forward differs

        def enc(cin: int, cout: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=True)

        def dec(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(3, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=True)

        self.encoder1 = enc(in_channels, fs)
        self.encoder2 = enc(fs, fs)
        self.encoder3 = enc(2 * fs, 2 * fs)
        self.encoder4 = enc(4 * fs, 4 * fs)
        self.encoder10 = enc(16 * fs, 16 * fs)
        self.decoder5 = dec(16 * fs, 8 * fs)
        self.decoder4 = dec(8 * fs, 4 * fs)
        self.decoder3 = dec(4 * fs, 2 * fs)
        self.decoder2 = dec(2 * fs, fs)
        self.decoder1 = dec(fs, fs)
        self.deep_channels = 16 * fs
        self.out_channels = fs

    @classmethod
    def kwargs_from_state(cls, state) -> dict:
        """``feature_size`` and ``num_heads`` of the backbone that produced ``state`` (model key names)."""
        heads = tuple(int(state[f"backbone.swinViT.layers{i}.0.blocks.0.attn.relative_position_bias_table"].shape[1])
                      for i in range(1, 5))
        return {"feature_size": int(state["backbone.swinViT.patch_embed.proj.weight"].shape[0]), "num_heads": heads}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.is_grad_enabled() and not torch.jit.is_tracing():  # exporters cannot follow in-place views
            return self._forward_lean(x)
        # normalize=True: every stage output passes through an affine-free LayerNorm (MONAI's proj_out).
        hidden = self.swinViT(x, normalize=True)
        enc0 = self.encoder1(x)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        deepest = self.encoder10(hidden[4])
        d = self.decoder5(deepest, hidden[3])
        d = self.decoder4(d, enc3)
        d = self.decoder3(d, enc2)
        d = self.decoder2(d, enc1)
        out = self.decoder1(d, enc0)
        return deepest, out

    def _forward_lean(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same computation without autograd, freeing each feature map after its last use
        (:mod:`.low_memory`): peak memory of a 96^3 window drops by about half."""
        hidden = list(self.swinViT(x, normalize=True))
        enc0 = [low_memory.basic_block(self.encoder1, [x])]
        enc1 = [low_memory.basic_block(self.encoder2, [hidden[0]])]
        enc2 = [low_memory.basic_block(self.encoder3, [hidden[1]])]
        enc3 = [low_memory.basic_block(self.encoder4, [hidden[2]])]
        deepest = low_memory.basic_block(self.encoder10, [hidden[4]])
        hidden = [hidden[3]]
        d = low_memory.up_block(self.decoder5, deepest, hidden)
        d = low_memory.up_block(self.decoder4, d, enc3)
        d = low_memory.up_block(self.decoder3, d, enc2)
        d = low_memory.up_block(self.decoder2, d, enc1)
        return deepest, low_memory.up_block(self.decoder1, d, enc0)

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

Without autograd the backbone runs in one of two memory-lean forms with the same arithmetic: in PyTorch,
in-place normalisation that frees every feature map after its last use (:mod:`.low_memory`); for a graph
exporter (OpenVINO), a graph arranged so that the runtime's own buffer plan stays small
(``SwinUNETRBackbone._forward_blocks(x, export=True)``).
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
        position_bias = self.position_bias(n)
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

    def position_bias(self, n: int) -> torch.Tensor:
        """The (heads, n, n) relative-position bias of windows of ``n`` tokens."""
        index = self.relative_position_index[:n, :n].reshape(-1)  # the [:n, :n] quirk, as MONAI
        return self.relative_position_bias_table[index].reshape(n, n, self.num_heads).permute(2, 0, 1)

    def _attend_all(self, x: torch.Tensor, mask: torch.Tensor | None, position_bias: torch.Tensor) -> torch.Tensor:
        """The same attention as one fused call over all windows, for graph exporters (OpenVINO traces the
        model): no chunk loop writing into slices of an output, which traced graphs cannot express. Every
        tensor stays 4-D (windows, heads, tokens, size): OpenVINO's CPU plugin runs 4-D attention as its fused
        kernel, which never holds the (windows x heads x n x n) scores, but decomposes other ranks into
        matmul + softmax with the whole score tensor (0.48 GB at the first stage of a 96^3 window).

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
            # Windows are laid out sample-major, so window i uses region layout i % (windows per sample).
            per_sample = mask.shape[0]
            region = _region_one_hot(mask).to(q) * (_REGION_OFFSET / self.scale) ** 0.5
            region = region[None, :, None].expand(windows // per_sample, per_sample, heads, n, region.shape[-1])
            region = region.reshape(windows, heads, n, region.shape[-1])
            q = torch.cat([q, region], dim=-1)
            k = torch.cat([k, region], dim=-1)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias[None].to(q.dtype),
                                                      scale=self.scale)
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
        if torch.is_grad_enabled():
            return self._forward_blocks(x)
        # Graph exporters cannot follow the lean form's in-place views; they trace a form of their own.
        return self._forward_blocks(x, export=True) if torch.jit.is_tracing() else self._forward_lean(x)

    def _forward_blocks(self, x: torch.Tensor, export: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """MONAI's blocks as they are (training); with ``export``, the form graph exporters (OpenVINO) trace.

        A graph runtime plans its buffers from the graph alone. In the export form the last decoder stage,
        where the full-resolution maps meet, never materialises its upsampled input or the concatenation
        (:func:`_up_block_without_concat`), which lowers the memory OpenVINO allocates for a 96^3 window's
        intermediates and logits from 0.77 to 0.65 GB. The first encoder block (full resolution too) comes
        after the transformer, so a runtime that follows the traced order need not hold its 170 MB output
        through the transformer stages.
        """
        # normalize=True: every stage output passes through an affine-free LayerNorm (MONAI's proj_out).
        hidden = self.swinViT(x, normalize=True)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        deepest = self.encoder10(hidden[4])
        d = self.decoder5(deepest, hidden[3])
        d = self.decoder4(d, enc3)
        d = self.decoder3(d, enc2)
        d = self.decoder2(d, enc1)
        enc0 = self.encoder1(x)
        if export:
            return deepest, _up_block_without_concat(self.decoder1, d, enc0)
        return deepest, self.decoder1(d, enc0)

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


def _up_block_without_concat(block: UnetrUpBlock, inp: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """MONAI's ``UnetrUpBlock`` (transposed convolution, concatenation with ``skip``, residual block) without
    the upsampled map or the concatenation: exact linear algebra, for a graph runtime's memory plan.

    The residual block's two convolutions of ``cat(up, skip)`` are sums of a convolution of ``up`` (their
    first input channels) and one of ``skip``. ``up`` is a 2x2x2 stride-2 transposed convolution of ``inp``,
    and a convolution of it is again a stride-2 transposed convolution of ``inp`` (:func:`_compose_up`),
    so ``up`` (a 48-channel 96^3 map, 170 MB) and the concatenation (340 MB) never exist: the stage holds
    ``skip`` and the two convolution outputs instead of four full-resolution maps. The result equals the
    block's up to float rounding; it costs fewer operations too (8 input taps per voxel instead of 27).
    Blocks built otherwise (biases, strides, no residual convolution) run as the module.
    """
    res = block.conv_block
    if not _composable(block):
        return block(inp, skip)
    conv1, conv3 = res.conv1.conv, res.conv3.conv
    up_channels = conv1.in_channels - skip.shape[1]
    upsample = block.transp_conv.conv.weight
    padding = conv1.kernel_size[0] // 2
    a = F.conv_transpose3d(inp, _compose_up(conv1.weight[:, :up_channels], upsample), stride=2, padding=padding)
    a = a + F.conv3d(skip, conv1.weight[:, up_channels:], padding=padding)
    r = F.conv_transpose3d(inp, _compose_up(conv3.weight[:, :up_channels], upsample), stride=2)
    r = r + F.conv3d(skip, conv3.weight[:, up_channels:])
    a = res.lrelu(res.norm1(a))
    return res.lrelu(res.norm2(res.conv2(a)) + res.norm3(r))


def _composable(block: UnetrUpBlock) -> bool:
    """Whether ``block`` is built as :func:`_up_block_without_concat` assumes (as every Swin UNETR decoder
    stage is): bias-free convolutions, a 2x2x2 stride-2 upsampling, an odd cubic "same" first convolution
    and a 1x1x1 residual convolution."""
    res = block.conv_block
    upsampling, conv1 = block.transp_conv.conv, res.conv1.conv
    conv3 = getattr(getattr(res, "conv3", None), "conv", None)
    if conv3 is None or any(c.bias is not None or c.groups != 1 for c in (upsampling, conv1, conv3)):
        return False
    k = conv1.kernel_size[0]
    return (tuple(upsampling.kernel_size) == tuple(upsampling.stride) == (2, 2, 2)
            and tuple(conv1.kernel_size) == (k,) * 3 and k % 2 == 1 and tuple(conv1.padding) == (k // 2,) * 3
            and tuple(conv3.kernel_size) == (1, 1, 1)
            and all(tuple(c.stride) == tuple(c.dilation) == (1, 1, 1) for c in (conv1, conv3)))


def _compose_up(kernel: torch.Tensor, upsample: torch.Tensor) -> torch.Tensor:
    """The transposed-convolution weight equal to ``conv3d(conv_transpose3d(x, upsample, stride=2), kernel,
    padding=k // 2)`` for a 2x2x2 ``upsample`` (in, mid, 2, 2, 2) and a k^3 ``kernel`` (out, mid, k, k, k),
    k odd: weight (in, out, k + 1, k + 1, k + 1), used with ``stride=2, padding=k // 2``.

    Per axis, upsampled position 2j + p (p = 0, 1) comes from input j, and the convolution reads it at
    offset o = -(k // 2) .. k // 2 from the output position y = 2j + p - o. A transposed convolution with
    stride 2 and padding k // 2 writes input j's tap t to y = 2j + t - k // 2, so tap t = p - o + k // 2
    collects every (p, o) pair with that difference. Composed in numpy in float64 and returned in the
    kernel's dtype: the weights are constants, so a trace keeps the result as one.
    """
    kernel64 = kernel.detach().cpu().double().numpy()
    upsample64 = upsample.detach().cpu().double().numpy()
    k = kernel64.shape[-1]
    weight = np.zeros((upsample64.shape[0], kernel64.shape[0]) + (k + 1,) * 3)
    for p in np.ndindex(2, 2, 2):
        for o in np.ndindex(k, k, k):  # kernel index: offset + k // 2, so the tap is p - o + 2 (k // 2)
            t = tuple(pi - oi + 2 * (k // 2) for pi, oi in zip(p, o))
            weight[(slice(None), slice(None), *t)] += upsample64[(..., *p)] @ kernel64[(..., *o)].T
    return torch.from_numpy(weight).to(kernel.device, kernel.dtype)

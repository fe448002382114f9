"""The Universal Model: a segmentation backbone plus the text-driven, per-class dynamic head.

For each requested class *n* the head turns the class's text embedding and a global image feature into
the 153 weights of a tiny per-voxel network (8 -> 8 -> 8 -> 1 channels, ReLU between, 1x1x1) that is
applied to a shared 8-channel feature map; each class is an independent sigmoid (one vs all).
The backbone runs once per input whatever the number of classes, and only the requested classes' heads
are evaluated, which makes a 2-class request much cheaper than 32 classes in the head and in memory.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import get_backbone
from ..settings import ModelConfig
from . import low_memory

__all__ = ["ModelConfig", "UniversalModel", "HEAD_PARAMS"]

HEAD_CHANNELS = 8
# Per class: W1 (8x8), W2 (8x8), W3 (1x8), b1 (8), b2 (8), b3 (1), in this order (official layout).
_HEAD_SPLITS = (HEAD_CHANNELS * HEAD_CHANNELS, HEAD_CHANNELS * HEAD_CHANNELS, HEAD_CHANNELS, HEAD_CHANNELS, HEAD_CHANNELS, 1)
HEAD_PARAMS = sum(_HEAD_SPLITS)  # 153
_GAP_CHANNELS = 256
# Bytes of head intermediates per chunk of classes; bounds memory for 32 classes on big windows.
_HEAD_CHUNK_BYTES = 64 * 2**20


class UniversalModel(nn.Module):
    """Backbone + text-driven head. State-dict keys equal the official ``Universal_model``'s.

    ``organ_embedding`` (``num_classes x embedding_dim``) holds the label embeddings (CLIP text features
    of the class prompts); it is a buffer, loaded from the checkpoint, never trained.
    """

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or ModelConfig()
        self.backbone = get_backbone(cfg.backbone).build(**cfg.backbone_kwargs)
        deep, out = self.backbone.deep_channels, self.backbone.out_channels
        self.precls_conv = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, out), nn.ReLU(inplace=True), nn.Conv3d(out, HEAD_CHANNELS, kernel_size=1)
        )
        self.GAP = nn.Sequential(
            nn.GroupNorm(cfg.norm_groups, deep), nn.ReLU(inplace=True), nn.AdaptiveAvgPool3d(1),
            nn.Conv3d(deep, _GAP_CHANNELS, kernel_size=1),
        )
        self.controller = nn.Conv3d(2 * _GAP_CHANNELS, HEAD_PARAMS, kernel_size=1)
        self.register_buffer("organ_embedding", torch.zeros(cfg.num_classes, cfg.embedding_dim))
        self.text_to_vision = nn.Linear(cfg.embedding_dim, _GAP_CHANNELS)

    @property
    def num_classes(self) -> int:
        return self.organ_embedding.shape[0]

    def forward(self, x: torch.Tensor, channels: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, K, *spatial)`` for the given 0-based class channels (all classes when None)."""
        m = self.config.spatial_multiple
        if x.dim() != 5 or x.shape[1] != 1 or any(s % m or s < 2 * m for s in x.shape[2:]):
            raise ValueError(f"Expected input (B, 1, D, H, W) with D, H, W multiples of {m} and at least {2 * m} "
                             f"(the deepest feature needs 2 voxels per axis); got {tuple(x.shape)}.")
        deepest, decoded = self.backbone(x)
        if not torch.is_grad_enabled() and not torch.jit.is_tracing():  # exporters cannot follow in-place views
            # `decoded` is ours alone: normalise it in place instead of allocating another full-size map.
            params = self.dynamic_params(deepest, channels)
            norm, act, conv = self.precls_conv
            shared = conv(act(low_memory.group_norm_(decoded, norm)))
            del decoded
            if shared.shape[0] == 1:  # the sliding window's case: no stacking copy
                return apply_dynamic_head(shared[0], params[0])[None]
            return torch.stack([apply_dynamic_head(shared[b], params[b]) for b in range(shared.shape[0])])
        return self.head(deepest, decoded, channels)

    def head(self, deepest: torch.Tensor, decoded: torch.Tensor,
             channels: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Text-driven head on backbone features; see :meth:`dynamic_params` and :func:`apply_dynamic_head`."""
        params = self.dynamic_params(deepest, channels)  # (B, K, 153)
        shared = self.precls_conv(decoded)  # (B, 8, *spatial), one map for all classes
        return torch.stack([apply_dynamic_head(shared[b], params[b]) for b in range(shared.shape[0])])

    def dynamic_params(self, deepest: torch.Tensor, channels: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample, per-class head weights ``(B, K, 153)`` from the global feature and the embeddings."""
        # Parameters are computed for every class and then selected: the controller is tiny, and this
        # keeps a subset's logits bit-identical to the same channels of a full run (BLAS results can
        # depend on the number of rows).
        task = F.relu(self.text_to_vision(self.organ_embedding))  # (N, 256)
        global_feature = self.GAP(deepest).flatten(1)  # (B, 256): one vector per sample
        b, n = global_feature.shape[0], task.shape[0]
        cond = torch.cat([global_feature[:, None, :].expand(-1, n, -1), task[None].expand(b, -1, -1)], dim=2)
        weight = self.controller.weight.flatten(1)  # the 1x1x1 conv is a linear map
        params = cond @ weight.t() + self.controller.bias  # (B, N, 153)
        if channels is None:
            return params
        index = torch.as_tensor(channels, dtype=torch.long, device=params.device).reshape(-1)
        if index.numel() == 0 or int(index.min()) < 0 or int(index.max()) >= n:
            raise ValueError(f"Class channels must be within 0..{n - 1}; got {index.tolist()}.")
        return params[:, index]


def apply_dynamic_head(features: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Evaluate K per-class heads on one sample's shared features.

    ``features`` (8, *spatial), ``params`` (K, 153) -> logits (K, *spatial). Classes are processed in
    chunks so the (K, 8, voxels) intermediates stay within a fixed memory budget.
    """
    spatial = features.shape[1:]
    h = features.reshape(HEAD_CHANNELS, -1)
    voxels = h.shape[1]
    w1, w2, w3, b1, b2, b3 = torch.split(params, _HEAD_SPLITS, dim=1)
    k = params.shape[0]
    w1 = w1.reshape(k, HEAD_CHANNELS, HEAD_CHANNELS)  # [class, out, in], row-major as in the official split
    w2 = w2.reshape(k, HEAD_CHANNELS, HEAD_CHANNELS)
    w3 = w3.reshape(k, 1, HEAD_CHANNELS)
    chunk = max(1, _HEAD_CHUNK_BYTES // (HEAD_CHANNELS * voxels * h.element_size()))
    out = []
    for s in range(0, k, chunk):
        sl = slice(s, s + chunk)
        y = torch.relu(torch.matmul(w1[sl], h) + b1[sl, :, None])
        y = torch.relu(torch.bmm(w2[sl], y) + b2[sl, :, None])
        out.append(torch.bmm(w3[sl], y)[:, 0] + b3[sl])
    return torch.cat(out).reshape(k, *spatial)

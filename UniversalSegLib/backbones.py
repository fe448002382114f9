"""The backbone registry: every segmentation backbone the Universal Model can use, by name.

A checkpoint stores its backbone as data: the registered name and the keyword arguments of the backbone
class (``ModelConfig.backbone`` and ``ModelConfig.backbone_kwargs``). Everything else that depends on the
backbone is read from its :class:`BackboneSpec`: how to build it, how to recognise it in a state dict of
unknown origin, how to read its arguments back from tensor shapes, its official and reduced sizes, and
the multiple its input sizes must be.

This module imports nothing heavy (the class is named by a dotted path and imported when a network is
built), so the Slicer module and checkpoint metadata can use it without PyTorch.

Adding a backbone (see ARCHITECTURE.md): write an ``nn.Module`` whose ``forward(x)`` returns
``(deepest feature map, full-resolution decoder features)``, which has ``deep_channels`` and
``out_channels`` attributes and a ``kwargs_from_state(state)`` class method, then call
:func:`register_backbone` with its spec.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

__all__ = ["BackboneSpec", "BACKBONES", "register_backbone", "get_backbone", "detect_backbone", "backbone_names"]

#: A backbone class, or its dotted path "package.module:ClassName" (imported when first built).
BackboneClass = Union[str, Callable[..., Any]]


@dataclass(frozen=True)
class BackboneSpec:
    """What UniversalSeg knows about one backbone.

    Attributes:
        name: the registered name, stored in checkpoints (``"swinunetr"``).
        label: the name shown to people (``"Swin UNETR"``).
        cls: the ``nn.Module`` class or its dotted path ``"module:Class"``; called with the keyword
            arguments. Instances have ``deep_channels``/``out_channels`` and return ``(deepest, decoded)``;
            the class has ``kwargs_from_state(state) -> dict`` (its arguments read from tensor shapes).
        defaults: keyword arguments of the official (released) size.
        small: keyword arguments of a reduced size with the same structure, for tests and demos.
        spatial_multiple: input sizes must be multiples of this (one per halving of the resolution).
        key_prefix: a state-dict key prefix only this backbone has; recognises official files.
    """

    name: str
    label: str
    cls: BackboneClass
    defaults: Mapping[str, Any] = field(default_factory=dict)
    small: Mapping[str, Any] = field(default_factory=dict)
    spatial_multiple: int = 32
    key_prefix: str = ""

    def module_class(self) -> Callable[..., Any]:
        """The backbone class (imported on first use when given as a dotted path)."""
        if not isinstance(self.cls, str):
            return self.cls
        module, _, name = self.cls.partition(":")
        return getattr(importlib.import_module(module), name)

    def build(self, **kwargs: Any) -> Any:
        """An instance with ``defaults`` updated by ``kwargs``."""
        return self.module_class()(**{**self.defaults, **kwargs})

    def kwargs_from_state(self, state: Mapping[str, Any]) -> dict:
        """The keyword arguments that built ``state`` (shapes only; raises KeyError for a missing key)."""
        return dict(self.module_class().kwargs_from_state(state))


#: Registered backbones by name, in registration order.
BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec, replace: bool = False) -> BackboneSpec:
    """Make ``spec`` known by its name (to checkpoints, the model, the command line and training)."""
    if spec.name in BACKBONES and not replace:
        raise ValueError(f"A backbone named {spec.name!r} is registered already.")
    BACKBONES[spec.name] = spec
    return spec


def backbone_names() -> tuple[str, ...]:
    return tuple(BACKBONES)


def get_backbone(name: str) -> BackboneSpec:
    """The spec of a registered backbone; ValueError naming the known ones otherwise."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"Unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}.") from None


def detect_backbone(keys) -> str | None:
    """The backbone whose key prefix appears among state-dict ``keys`` (model key names), or None."""
    keys = list(keys)
    for spec in BACKBONES.values():
        if spec.key_prefix and any(k.startswith(spec.key_prefix) for k in keys):
            return spec.name
    return None


# ---------------------------------------------------------------------------------------------- built-in
register_backbone(BackboneSpec(
    name="swinunetr", label="Swin UNETR", cls="UniversalSegLib.model.swin_unetr:SwinUNETRBackbone",
    defaults={"feature_size": 48, "num_heads": (3, 6, 12, 24)}, small={"feature_size": 16, "num_heads": (1, 2, 4, 8)},
    spatial_multiple=32,  # patch embedding (2x) and four merges (16x)
    key_prefix="backbone.swinViT.",
))
register_backbone(BackboneSpec(
    name="unet", label="U-Net", cls="UniversalSegLib.model.unet:UNet3DBackbone",
    defaults={"base_channels": 32}, small={"base_channels": 8},
    spatial_multiple=8,  # three max-poolings
    key_prefix="backbone.down_tr64.",
))

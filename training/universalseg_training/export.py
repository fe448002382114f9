"""Label embeddings for training, fine-tuning set-up, and export to the library's checkpoint format."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from UniversalSegLib import __version__ as library_version
from UniversalSegLib.checkpoints import Checkpoint, CheckpointMetadata, load_checkpoint, save_checkpoint
from UniversalSegLib.inference import InferenceParameters
from UniversalSegLib.model import ModelConfig, UniversalModel
from UniversalSegLib.taxonomy import ClassInfo, Taxonomy, get_taxonomy

from . import __version__
from .embeddings import label_embeddings
from .pretrained import load_pretrained_backbone

__all__ = ["MODEL_SIZES", "ModelSetup", "build_model_setup", "model_config", "export_checkpoint", "select_classes", "TRAINED_LICENSE"]

TRAINED_LICENSE = ("Weights trained with universalseg-training; the licence is chosen by whoever trained them "
                   "(and must respect the licences of the training data and of any initial checkpoint).")


#: Model sizes: the official widths, the library's reduced "small" (tests, demos) and an even smaller "tiny"
#: U-Net (base width 4) for CPU-only experiments.
MODEL_SIZES = ("official", "small", "tiny")


def model_config(backbone: str, size: str, num_classes: int) -> ModelConfig:
    """The architecture of a model size (see :data:`MODEL_SIZES`)."""
    if size == "official":
        return ModelConfig(backbone=backbone, num_classes=num_classes)
    if size == "small":
        return ModelConfig.small(backbone, num_classes=num_classes)
    if size == "tiny":
        if backbone != "unet":
            raise ValueError("model size 'tiny' exists for the unet backbone only; use 'small' for swinunetr")
        return ModelConfig(backbone="unet", num_classes=num_classes, backbone_kwargs={"base_channels": 4}, norm_groups=8)
    raise ValueError(f"unknown model size {size!r}; use one of {', '.join(MODEL_SIZES)}")


def select_classes(names: Sequence[str] | None, base: Taxonomy | None = None) -> Taxonomy:
    """The class table of a model: ``names`` (names or indices) resolved in ``base`` (default all 32)."""
    base = base or get_taxonomy()
    if not names:
        return base
    chosen: dict[int, ClassInfo] = {}
    for name in names:
        text = str(name).strip()
        if text.isdigit():
            info = base[int(text)]
            chosen[info.index] = info
        else:
            for info in base.resolve(text):
                chosen[info.index] = info
    return Taxonomy(list(chosen.values()))


class ModelSetup:
    """The network to train, its class table, label embeddings and which parameters learn.

    ``trainable_embedding``: for ``finetune="new_embeddings"``, the learnable embedding rows of the new
    classes (at channel positions ``new_rows``); every network weight and every old row stays frozen.
    :meth:`apply_embeddings` writes the current embeddings into the model's ``organ_embedding`` before
    each forward.
    """

    def __init__(self, model: UniversalModel, classes: Taxonomy, embedding_info: dict,
                 new_rows: torch.Tensor | None = None, trainable_embedding: torch.nn.Parameter | None = None):
        self.model = model
        self.classes = classes
        self.embedding_info = embedding_info
        self.base_embeddings = model.organ_embedding.detach().clone()
        self.new_rows = new_rows
        self.trainable_embedding = trainable_embedding
        self.pretrained: dict | None = None  # what load_pretrained_backbone copied, for the logs

    def parameters(self) -> list[torch.nn.Parameter]:
        if self.trainable_embedding is not None:
            return [self.trainable_embedding]
        return [p for p in self.model.parameters() if p.requires_grad]

    def _embeddings(self, detach: bool = False) -> torch.Tensor:
        values = self.trainable_embedding.detach() if detach else self.trainable_embedding
        base = self.base_embeddings.to(values.device)
        return base.index_put((self.new_rows.to(values.device),), values)  # differentiable in ``values``

    def apply_embeddings(self) -> None:
        if self.trainable_embedding is not None:
            # A non-leaf buffer value: gradients reach the new rows, the old rows stay as loaded.
            self.model.organ_embedding = self._embeddings()

    def final_embeddings(self) -> torch.Tensor:
        if self.trainable_embedding is not None:
            return self._embeddings(detach=True).cpu()
        return self.model.organ_embedding.detach().cpu()


def build_model_setup(backbone: str = "unet", model_size: str = "official", classes: Sequence[str] | None = None,
                      embedding: str = "auto", clip_weights: str | None = None, init_checkpoint: str | None = None,
                      finetune: str = "all", embedding_file: str | None = None,
                      pretrained_backbone: str | None = None) -> ModelSetup:
    """Create (or load, for fine-tuning) the model with its classes and label embeddings.

    ``pretrained_backbone``: initialise the backbone of a new model from self-supervised / Models Genesis
    weights (:mod:`.pretrained`); what was copied is kept in ``ModelSetup.pretrained`` (``run_info.json``).
    """
    if init_checkpoint is None:
        taxonomy = select_classes(classes)
        config = model_config(backbone, model_size, len(taxonomy))
        model = UniversalModel(config)
        vectors, info = label_embeddings(embedding, list(taxonomy), clip_weights, embedding_file)
        model.organ_embedding.copy_(torch.from_numpy(vectors))
        setup = ModelSetup(model, taxonomy, info)
        if pretrained_backbone:
            setup.pretrained = load_pretrained_backbone(model, pretrained_backbone, backbone)
        return setup

    checkpoint = load_checkpoint(init_checkpoint)
    old = checkpoint.metadata.classes
    wanted = list(classes or [])
    known, new_names = [], []
    for name in wanted:  # names the checkpoint knows keep their embedding; others are new classes
        try:
            known.extend(select_classes([name], old))
        except (ValueError, KeyError):
            new_names.append(str(name))
    if not new_names:
        model = checkpoint.build_model("cpu").train()
        if finetune == "new_embeddings":
            raise ValueError("finetune=new_embeddings: no new class names were given (all are known to the checkpoint)")
        return ModelSetup(model, old, dict(checkpoint.metadata.embedding))
    default = get_taxonomy()
    next_free = max(max(old.indices), max(default.indices)) + 1
    new_classes = []
    for name in new_names:
        try:  # a class of the default taxonomy keeps its index (when free), terminology, colour and kind
            template = default.resolve(name)
        except ValueError:
            template = []
        if len(template) == 1 and template[0].index not in old.indices:
            data = template[0].to_dict()
        else:
            data = {"display_name": name, "index": next_free}
            next_free += 1
        if data.get("key") in {c.key for c in old}:
            data["key"] = f"{data['key']}_{data['index']}"
        new_classes.append(ClassInfo.from_dict(data))
    taxonomy = old.extended(new_classes)
    encoder_name = checkpoint.metadata.embedding.get("encoder", "")
    if encoder_name.startswith("clip"):
        new_vectors = torch.from_numpy(label_embeddings("clip", new_classes, clip_weights)[0])
    else:  # one-hot / learnt spaces cannot name new classes: start them at small random vectors, learnt
        generator = torch.Generator().manual_seed(len(old))
        new_vectors = torch.randn(len(new_classes), checkpoint.metadata.model.embedding_dim, generator=generator) * 0.1
    # Channel order = class order of the table (sorted by index): place each new row at its class's position.
    rows = {c.index: row for c, row in zip(old, checkpoint.label_embeddings.float())}
    rows.update({c.index: row for c, row in zip(new_classes, new_vectors)})
    extended: Checkpoint = checkpoint.with_classes(taxonomy, torch.stack([rows[i] for i in taxonomy.indices]))
    model = extended.build_model("cpu").train()
    info = dict(checkpoint.metadata.embedding)
    info["fine_tuned_classes"] = [c.display_name for c in new_classes]
    if finetune == "new_embeddings":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        new_rows = torch.as_tensor([list(taxonomy.indices).index(c.index) for c in new_classes], dtype=torch.long)
        trainable = torch.nn.Parameter(new_vectors.clone().float())
        info["new_embeddings_learnt"] = True
        return ModelSetup(model, taxonomy, info, new_rows=new_rows, trainable_embedding=trainable)
    return ModelSetup(model, taxonomy, info)


def export_checkpoint(path: str | Path, model: UniversalModel, classes: Taxonomy, preprocessing, roi_size: Sequence[int],
                      embedding_info: Mapping[str, Any], provenance: Mapping[str, Any] | None = None,
                      embeddings: torch.Tensor | None = None, overwrite: bool = False,
                      license: str = TRAINED_LICENSE, overlap: float = 0.5) -> Path:
    """Write ``model`` as a UniversalSeg ``.safetensors`` checkpoint the library's ``Segmenter`` can run."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if embeddings is not None:
        state["organ_embedding"] = embeddings.detach().cpu().float().clone()
    metadata = CheckpointMetadata(
        model=model.config if model.config.num_classes == len(classes) else
        ModelConfig.from_dict({**model.config.to_dict(), "num_classes": len(classes)}),
        classes=classes,
        preprocessing=preprocessing,
        inference=InferenceParameters(roi_size=tuple(int(s) for s in roi_size), overlap=overlap, gaussian="current"),
        embedding=dict(embedding_info),
        provenance={"trained_with": f"universalseg-training {__version__} (UniversalSeg {library_version})",
                    "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    **dict(provenance or {})},
        license=license,
    )
    return save_checkpoint(Path(path), state, metadata, overwrite=overwrite)

"""Extending UniversalSeg through its registries alone (the three recipes of ARCHITECTURE.md): a toy
backbone, a toy output format and a toy class, each added without touching library code."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO_ROOT
from UniversalSegLib.api import OutputPlan, plan_outputs, write_result
from UniversalSegLib.backbones import BACKBONES, BackboneSpec, register_backbone
from UniversalSegLib.checkpoints import (Checkpoint, CheckpointMetadata, load_checkpoint, load_official_state_dict,
                                         save_checkpoint)
from UniversalSegLib.cli import build_parser
from UniversalSegLib.io import Volume
from UniversalSegLib.io.atomic import atomic_output
from UniversalSegLib.io.formats import OUTPUT_FORMATS, OutputFormat, parse_formats, register_output_format
from UniversalSegLib.io.masks import label_map_from_masks
from UniversalSegLib.model import ModelConfig, UniversalModel
from UniversalSegLib.pipeline import SegmentationResult, Segmenter
from UniversalSegLib.postprocess import postprocess_masks, required_classes
from UniversalSegLib.settings import InferenceParameters, PreprocessingParameters
from UniversalSegLib.taxonomy import ClassInfo, get_taxonomy


# ----------------------------------------------------------------------------------------------- backbone
class ToyBackbone(nn.Module):
    """Two convolutions and one pooling: deepest features at half resolution, decoder features at full."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.toy_encoder = nn.Conv3d(1, width, kernel_size=3, padding=1)
        self.toy_decoder = nn.Conv3d(width, width, kernel_size=3, padding=1)
        self.deep_channels = width
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.relu(self.toy_encoder(x))
        return nn.functional.max_pool3d(features, 2), self.toy_decoder(features)

    @classmethod
    def kwargs_from_state(cls, state) -> dict:
        return {"width": int(state["backbone.toy_encoder.weight"].shape[0])}


@pytest.fixture
def toy_backbone():
    spec = register_backbone(BackboneSpec(name="toy", label="Toy", cls=ToyBackbone, defaults={"width": 16},
                                          small={"width": 8}, spatial_multiple=2, key_prefix="backbone.toy_"))
    yield spec
    del BACKBONES["toy"]


def test_a_backbone_added_through_the_registry_builds_saves_loads_and_segments(toy_backbone, tmp_path):
    taxonomy = get_taxonomy()
    classes = type(taxonomy)([taxonomy[1], taxonomy[6]])
    config = ModelConfig(backbone="toy", num_classes=2, embedding_dim=16)
    assert config.backbone_kwargs == {"width": 16} and config.spatial_multiple == 2
    torch.manual_seed(0)
    model = UniversalModel(config).eval()
    assert model(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 2, 8, 8, 8)

    # Checkpoints store the backbone by name and arguments, and load it back.
    state = model.state_dict()
    metadata = CheckpointMetadata(model=config, classes=classes,
                                  inference=InferenceParameters(roi_size=(16, 16, 16)),
                                  preprocessing=PreprocessingParameters(spacing=(3.0, 3.0, 3.0)))
    path = save_checkpoint(tmp_path / "toy.safetensors", state, metadata)
    loaded = load_checkpoint(path)
    assert loaded.metadata.model == config
    # A file without metadata in the official layout ("module." prefix) is recognised from its keys and
    # sized from its tensor shapes.
    torch.save({"net": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "toy.pth")
    _, detected = load_official_state_dict(tmp_path / "toy.pth")
    assert detected == config

    # The whole pipeline runs with it.
    image = np.full((12, 12, 12), -1000, np.int16)
    image[2:10, 2:10, 2:10] = 60
    volume = Volume(image, np.diag([4.0, 4.0, 4.0, 1.0]), "toy.nii.gz", "nifti")
    result = Segmenter(Checkpoint(dict(state), loaded.metadata), device="cpu", threads=1).segment(volume)
    assert sorted(result.masks) == [1, 6] and result.masks[6].shape == image.shape


# ---------------------------------------------------------------------------------------------- format
def write_class_list(path, volume, masks, classes, overwrite: bool = False):
    """The toy format: one line per class, its name and voxel count."""
    names = {info.index: info.display_name for info in classes}
    with atomic_output(path, overwrite) as temporary:
        temporary.write_text("".join(f"{names[i]}\t{int(np.count_nonzero(m))}\n" for i, m in masks.items()))
    return path


@pytest.fixture
def class_list_format():
    fmt = register_output_format(OutputFormat("classlist", "class names and voxel counts (<case>_classes.txt)",
                                              "{case}_classes.txt", write_class_list, aliases=("txt",)))
    yield fmt
    del OUTPUT_FORMATS["classlist"]


def test_an_output_format_added_through_the_registry_is_planned_written_and_offered(class_list_format, tmp_path):
    taxonomy = get_taxonomy()
    volume = Volume(np.zeros((6, 5, 4), np.int16), np.eye(4), "case.nii.gz", "nifti")
    liver = np.zeros(volume.shape, bool)
    liver[1:4, 1:3, 1:3] = True
    result = SegmentationResult(volume=volume, classes=[taxonomy[6]], masks={6: liver})

    assert "classlist" in parse_formats("all") and parse_formats("txt") == ("classlist",)
    plan = plan_outputs("case.nii.gz", tmp_path, "classlist,nifti")
    written = write_result(result, plan)
    assert (tmp_path / "case_classes.txt").read_text() == "Liver\t12\n"
    assert written["classlist"] == tmp_path / "case_classes.txt" and written["nifti"].is_file()
    # Planned like the built-in formats: an existing output is not overwritten unasked.
    with pytest.raises(FileExistsError):
        OutputPlan(tmp_path, "case", ("classlist",)).check(overwrite=False)
    # ... and offered by the command line.
    segment_help = build_parser()._subparsers._group_actions[0].choices["segment"].format_help()
    assert "classlist" in " ".join(segment_help.split())


# ----------------------------------------------------------------------------------------------- class
def test_a_class_added_as_data_gets_its_rule_priority_and_catalogue_entry():
    taxonomy = get_taxonomy()
    lesion = ClassInfo.from_dict({
        "index": 33, "display_name": "Spleen Lesion", "kind": "tumor", "parent_organs": [1],
        "postprocess": {"rule": "inside_organ", "reads": ["spleen"], "components": 1}})
    extended = taxonomy.extended([lesion])

    # Post-processing: the rule and the classes it reads come from the class table.
    assert required_classes([33], taxonomy=extended) == [1, 33]
    spleen = np.zeros((24, 24, 24), bool)
    spleen[4:14, 4:14, 4:14] = True
    found = np.zeros_like(spleen)
    found[6:9, 6:9, 6:9] = True  # inside the spleen
    found[19:22, 19:22, 19:22] = True  # far outside it: removed
    cleaned = postprocess_masks({1: spleen, 33: found}, [33], taxonomy=extended)[33]
    assert cleaned[7, 7, 7] and not cleaned[20, 20, 20]

    # Label map: the kind decides the overlap, so the lesion shows inside its organ.
    labels = label_map_from_masks(spleen.shape, {1: spleen, 33: cleaned}, {1: taxonomy[1], 33: lesion})
    assert labels[7, 7, 7] == 33 and labels[12, 12, 12] == 1

    # The Slicer module's class picker offers it when a checkpoint's class table has it.
    sys.path.insert(0, str(REPO_ROOT / "UniversalSeg"))
    from UniversalSegSlicer.classes import ClassCatalog

    assert [extended[i].display_name for i in ClassCatalog(extended).search("spleen lesion")] == ["Spleen Lesion"]

"""The dataset presets of the official training datasets, each checked on a phantom labelled with that
dataset's own label convention.

The conventions below are written out here independently of the presets, from the official repository's
``label_transfer.py`` (raw value v -> universal class list[v-1], 0 = dropped), its loss templates (which
classes each dataset annotates) and its training transforms (lesion-weighted crops only for LiTS and the
MSD liver, pancreas and hepatic-vessel tasks; zoom for every MSD task). A phantom's complete truth is
painted with each dataset's raw values; the preset must turn it back into the right taxonomy classes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest

from UniversalSegLib.phantom import generate_phantom, phantom_raw_labels
from UniversalSegLib.taxonomy import get_taxonomy
from universalseg_training.assembly import class_masks_from_maps, harmonise_labels
from universalseg_training.cli import main as cli_main
from universalseg_training.presets import PRESETS
from universalseg_training.spec import DatasetSpec, DatasetSpecError

# preset -> (raw -> universal class or 0, organs split into right/left, annotated template, organ merges)
OFFICIAL = {
    "btcv": (list(range(1, 15)), (), list(range(1, 15)), {}),
    "tcia_pancreas_ct": ([1, 0, 3, 4, 5, 6, 7, 0, 0, 0, 11, 0, 0, 14], (), [1, 3, 4, 5, 6, 7, 11, 14], {}),
    "chaos": ([6], (), [6], {}),
    "lits": ([6, 27], (), [6, 27], {27: (6,)}),
    "kits": ([2, 26, 32], (2,), [2, 3, 26, 32], {26: (2, 3), 32: (2, 3)}),
    "word": ([6, 1, 3, 2, 7, 4, 5, 11, 14, 18, 19, 12, 20, 21, 23, 24], (12,),
             [6, 1, 3, 2, 7, 4, 5, 11, 14, 18, 19, 12, 13, 20, 21, 23, 24], {}),
    "abdomenct1k": ([6, 2, 1, 11], (2,), [6, 2, 3, 1, 11], {}),
    "amos": ([1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 21, 22], (), [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 21, 22],
             {}),
    "ctorg": ([6, 21, 16, 2, 0], (16, 2), [6, 21, 16, 17, 2, 3], {}),
    "abdomenct12organ": ([6, 2, 1, 11, 8, 9, 7, 4, 5, 12, 13, 25], (2,), [6, 2, 3, 1, 11, 8, 9, 7, 4, 5, 12, 13, 25], {}),
    "msd_liver": ([6, 27], (), [6, 27], {27: (6,)}),
    "msd_lung": ([30], (), [30], {}),
    "msd_pancreas": ([11, 28], (), [11, 28], {28: (11,)}),
    "msd_hepatic_vessel": ([15, 29], (), [15, 29], {}),  # the vessel tumour is NOT merged into the vessel
    "msd_spleen": ([1], (), [1], {}),
    "msd_colon": ([31], (), [31], {}),
}
LESION_CROPS = {"lits", "msd_liver", "msd_pancreas", "msd_hepatic_vessel"}
# Structures the dropped raw values mark in the real datasets (painted, then expected as background).
DROPPED = {"tcia_pancreas_ct": {2: "right kidney", 8: "aorta", 9: "inferior vena cava",
                                10: "portal vein and splenic vein", 12: "right adrenal gland", 13: "left adrenal gland"},
           "ctorg": {5: "bone"}}
PAIRS = {2: "kidney", 12: "adrenal gland", 16: "lung"}  # right organ of a pair -> name of both


@lru_cache(maxsize=None)
def _phantom(seed: int):
    # 56^3 at 6 mm with every lesion type drawn: seed 0 shows every class but the lung tumour, seed 1 has it.
    return generate_phantom(seed, shape=(56, 56, 56), spacing=(6.0, 6.0, 6.0), lesion_probability=1.0)


def _raw_convention(name: str) -> dict[int, str]:
    """raw value -> what to paint, from the official table (not from the preset)."""
    taxonomy = get_taxonomy()
    table, pairs, _, _ = OFFICIAL[name]
    paint = {}
    for raw, universal in enumerate(table, start=1):
        if universal == 0:
            paint[raw] = DROPPED[name][raw]
        else:
            paint[raw] = PAIRS[universal] if universal in pairs else taxonomy[universal].display_name
    return paint


def test_every_official_training_dataset_has_a_preset(capsys):
    assert set(PRESETS) == set(OFFICIAL)
    assert cli_main(["presets"]) == 0 and len(capsys.readouterr().out.splitlines()) == len(OFFICIAL)
    assert {p["official_key"] for p in PRESETS.values()} == {
        "01", "02", "03", "04", "05", "07", "08", "09", "12", "13", "10_03", "10_06", "10_07", "10_08", "10_09", "10_10"}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_preset_maps_the_datasets_own_labels(name):
    table, pairs, template, merges = OFFICIAL[name]
    spec = DatasetSpec.from_dict({"preset": name, "cases": [{"id": "case_0001", "image": "i.nii.gz", "labels": "l.nii.gz"}]})
    assert spec.name == name and spec.preset == name
    assert spec.annotated == tuple(sorted(template))
    assert spec.crops == ("lesions" if name in LESION_CROPS else "pos_neg")
    assert spec.zoom == name.startswith("msd_")

    phantom = next(p for p in map(_phantom, (0, 1)) if all(p.masks[u].any() for u in table if u))
    raw = phantom_raw_labels(phantom, {"labels": _raw_convention(name)})
    labels, host = harmonise_labels(raw, phantom.affine, spec, phantom.image)
    for value, universal in enumerate(table, start=1):
        voxels = raw == value
        if universal == 0:
            assert not labels[voxels].any(), f"raw {value} should be dropped"
        elif universal in pairs:  # one raw value for both sides: split by patient side
            for side in (universal, universal + 1):
                np.testing.assert_array_equal(labels[voxels & phantom.masks[side]], side)
        else:
            assert voxels.any() and (labels[voxels] == universal).all(), f"raw {value} -> class {universal}"
    masks = class_masks_from_maps(labels, host, spec.annotated, spec.includes)
    for lesion, organs in merges.items():  # organ includes its lesion, as the official label transfer merges it
        hosts = np.logical_or.reduce([masks[o] for o in organs])
        assert masks[lesion].any() and hosts[masks[lesion]].all()
    if name == "msd_hepatic_vessel":
        assert masks[29].any() and not (masks[15] & masks[29]).any()


def test_btcv_layout_and_cases_from_60_on_annotate_the_official_8_classes(tmp_path):
    for folder, prefix in (("img", "img"), ("label", "label")):
        (tmp_path / folder).mkdir()
        for number in ("0001", "0061"):
            (tmp_path / folder / f"{prefix}{number}.nii.gz").write_bytes(b"")
    spec = DatasetSpec.from_dict({"preset": "btcv", "root": str(tmp_path), "images": "img/img*.nii.gz",
                                  "labels": "label/label{digits}.nii.gz"})
    assert [c.labels for c in spec.cases] == [tmp_path / "label" / "label0001.nii.gz",
                                              tmp_path / "label" / "label0061.nii.gz"]
    assert spec.annotated_for("img0001") == tuple(range(1, 15))
    assert spec.annotated_for("img0061") == (1, 3, 4, 5, 6, 7, 11, 14)


def test_msd_preset_finds_the_decathlon_layout_and_entries_override(tmp_path):
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
        for case in ("liver_0", "liver_1"):
            (tmp_path / folder / f"{case}.nii.gz").write_bytes(b"")
    (tmp_path / "liver.yaml").write_text(f"preset: msd_liver\nroot: {tmp_path}\nname: my_liver\nsampling: {{crops: pos_neg}}\n")
    from universalseg_training.spec import load_dataset_spec

    spec = load_dataset_spec(tmp_path / "liver.yaml")
    assert spec.name == "my_liver" and [c.case_id for c in spec.cases] == ["liver_0", "liver_1"]
    assert spec.cases[1].labels == tmp_path / "labelsTr" / "liver_1.nii.gz"
    assert spec.crops == "pos_neg" and spec.zoom is False  # the user's sampling entry replaces the preset's
    with pytest.raises(DatasetSpecError, match="unknown dataset preset 'lits2'; known presets: .*lits"):
        DatasetSpec.from_dict({"preset": "lits2", "cases": []})

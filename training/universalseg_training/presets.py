"""Dataset specifications of the public datasets the CLIP-Driven Universal Model was trained on.

A preset holds what the official code knows about a dataset: which raw label value is which class (the
``label_transfer.py`` tables of the official repository), which classes the dataset annotates (its loss
template), whether a lesion is counted in its organ, and how training crops are drawn (``sampling``):

* ``crops: lesions`` (background:organ:lesion = 1:1:5) only for LiTS and the MSD liver, pancreas and
  hepatic-vessel tasks; every other dataset draws positive:negative = 2:1 crops;
* ``zoom: true`` (random zoom 1.3-1.5 with probability 0.3, before cropping) for every MSD task only.

Organ channels include their lesions (liver includes liver tumour, kidneys include tumour and cyst,
pancreas includes pancreas tumour) except in MSD Task08, where the official code keeps the hepatic vessel
and the vessel tumour separate.

A dataset specification names a preset and says where the user's copy of the data is::

    preset: msd_liver
    root: /data/Task03_Liver          # MSD presets know their imagesTr/labelsTr layout
    ---
    preset: btcv
    root: /data/BTCV
    images: img/*.nii.gz
    labels: label/label{id_digits}.nii.gz   # or a list of cases: [{image, labels}, ...]

Entries given in the specification override the preset's (e.g. ``name``, ``annotated``, ``sampling``).
"""
from __future__ import annotations

import copy
from typing import Any

__all__ = ["PRESETS", "preset"]

_MSD_LAYOUT = {"images": "imagesTr/*.nii.gz", "labels": "labelsTr/{name}"}
_POS_NEG = {"crops": "pos_neg", "zoom": False}
_LESIONS = {"crops": "lesions", "zoom": False}
_MSD_POS_NEG = {"crops": "pos_neg", "zoom": True}
_MSD_LESIONS = {"crops": "lesions", "zoom": True}

# Raw label value -> class index of the 32-class taxonomy (or a paired-organ name that is split into right
# and left by patient side, or None = dropped). Numbers from the official label_transfer.py tables.
PRESETS: dict[str, dict[str, Any]] = {
    "btcv": {  # 01 Multi-Atlas Labeling Beyond the Cranial Vault
        "official_key": "01", "sampling": _POS_NEG,
        "classes": {v: v for v in range(1, 15)},
        # The official loss uses an 8-class template for BTCV cases numbered 60 and above.
        "subsets": [{"case_number_at_least": 60, "annotated": [1, 3, 4, 5, 6, 7, 11, 14]}],
    },
    "tcia_pancreas_ct": {  # 02 TCIA Pancreas-CT with the multi-organ labels in BTCV numbering
        "official_key": "02", "sampling": _POS_NEG,
        "classes": {1: 1, 2: None, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: None, 9: None, 10: None, 11: 11, 12: None,
                    13: None, 14: 14},
    },
    "chaos": {"official_key": "03", "sampling": _POS_NEG, "classes": {1: 6}},
    "lits": {"official_key": "04", "sampling": _LESIONS, "classes": {1: 6, 2: 27}},
    "kits": {"official_key": "05", "sampling": _POS_NEG, "classes": {1: "kidney", 2: 26, 3: 32}},
    "word": {
        "official_key": "07", "sampling": _POS_NEG,
        "classes": {1: 6, 2: 1, 3: 3, 4: 2, 5: 7, 6: 4, 7: 5, 8: 11, 9: 14, 10: 18, 11: 19, 12: "adrenal gland",
                    13: 20, 14: 21, 15: 23, 16: 24},
    },
    "abdomenct1k": {"official_key": "08", "sampling": _POS_NEG, "classes": {1: 6, 2: "kidney", 3: 1, 4: 11}},
    "amos": {
        "official_key": "09", "sampling": _POS_NEG,
        "classes": {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 9: 9, 10: 11, 11: 12, 12: 13, 13: 14, 14: 21,
                    15: 22},
    },
    "ctorg": {  # raw 5 (bones) and 6 (brain) are not in the taxonomy
        "official_key": "12", "sampling": _POS_NEG,
        "classes": {1: 6, 2: 21, 3: "lung", 4: "kidney", 5: None, 6: None},
    },
    "abdomenct12organ": {
        "official_key": "13", "sampling": _POS_NEG,
        "classes": {1: 6, 2: "kidney", 3: 1, 4: 11, 5: 8, 6: 9, 7: 7, 8: 4, 9: 5, 10: 12, 11: 13, 12: 25},
    },
    "msd_liver": {"official_key": "10_03", "sampling": _MSD_LESIONS, "classes": {1: 6, 2: 27}, **_MSD_LAYOUT},
    "msd_lung": {"official_key": "10_06", "sampling": _MSD_POS_NEG, "classes": {1: 30}, **_MSD_LAYOUT},
    "msd_pancreas": {"official_key": "10_07", "sampling": _MSD_LESIONS, "classes": {1: 11, 2: 28}, **_MSD_LAYOUT},
    "msd_hepatic_vessel": {  # the official code keeps the vessel tumour out of the vessel
        "official_key": "10_08", "sampling": _MSD_LESIONS, "classes": {1: 15, 2: 29}, "lesions_in_organs": False,
        **_MSD_LAYOUT},
    "msd_spleen": {"official_key": "10_09", "sampling": _MSD_POS_NEG, "classes": {1: 1}, **_MSD_LAYOUT},
    "msd_colon": {"official_key": "10_10", "sampling": _MSD_POS_NEG, "classes": {1: 31}, **_MSD_LAYOUT},
}


def preset(name: str) -> dict[str, Any]:
    """A copy of preset ``name`` as specification entries (``name`` defaults to the preset's name)."""
    if name not in PRESETS:
        raise KeyError(f"unknown dataset preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    entries = copy.deepcopy(PRESETS[name])
    entries.pop("official_key")
    entries.setdefault("name", name)
    return entries

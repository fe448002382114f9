"""The extension's own terminology context: the class types that neither of Slicer's lists has.

Slicer's terminology selector shows only types of a loaded context, and the segments of the portal and
splenic vein and of the femoral heads name types that are not in the DICOM master list. The class table
(``UniversalSegLib/data/taxonomy.json``) puts them in :data:`~UniversalSegLib.taxonomy.UNIVERSALSEG_CONTEXT`;
:func:`terminology_context` turns those classes into a Slicer ``.term.json`` (codes, colours, left/right
modifiers). The module ships the result as ``Resources/Terminology/UniversalSeg.term.json`` (a test keeps
the two equal) and loads it when Slicer has started.
"""
from __future__ import annotations

import json
from pathlib import Path

from UniversalSegLib.taxonomy import UNIVERSALSEG_CONTEXT, Taxonomy, get_taxonomy

__all__ = ["TERMINOLOGY_FILE", "terminology_context", "terminology_json", "load_terminology"]

TERMINOLOGY_FILE = Path(__file__).resolve().parent.parent / "Resources" / "Terminology" / "UniversalSeg.term.json"
_SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/schemas/segment-context-schema.json#"


def _code(term) -> dict:
    return {"CodingSchemeDesignator": term.scheme, "CodeValue": term.value, "CodeMeaning": term.meaning}


def terminology_context(taxonomy: Taxonomy | None = None) -> dict:
    """The ``.term.json`` content for the classes whose terminology context is UniversalSeg's own."""
    taxonomy = taxonomy or get_taxonomy()
    categories: dict = {}
    for info in taxonomy:
        entry = info.terminology
        if entry.context != UNIVERSALSEG_CONTEXT:
            continue
        category = categories.setdefault(entry.category, {**_code(entry.category), "showAnatomy": "false", "Type": {}})
        kind = category["Type"].setdefault(entry.type, {**_code(entry.type),
                                                        "recommendedDisplayRGBValue": list(info.color)})
        if entry.type_modifier is not None:
            kind.setdefault("Modifier", []).append({**_code(entry.type_modifier),
                                                    "recommendedDisplayRGBValue": list(info.color)})
    return {"SegmentationCategoryTypeContextName": UNIVERSALSEG_CONTEXT, "@schema": _SCHEMA,
            "SegmentationCodes": {"Category": [{**c, "Type": list(c["Type"].values())} for c in categories.values()]}}


def terminology_json(taxonomy: Taxonomy | None = None) -> str:
    return json.dumps(terminology_context(taxonomy), indent=2) + "\n"


def load_terminology(terminologies_logic, path: str | Path = TERMINOLOGY_FILE) -> str:
    """Load the extension's context into Slicer's terminology logic; returns its name (raises if it fails)."""
    name = terminologies_logic.LoadTerminologyFromFile(str(path))
    if not name:
        raise RuntimeError(f"Slicer could not load the terminology file {path}")
    return name

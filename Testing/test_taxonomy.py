"""Tests of the class taxonomy: official order and prompts, terminology, colours, resolver, serialisation,
and the terminology strings read back by real Slicer code (slicer-core)."""
from __future__ import annotations

import json
import math
import re

import pytest
from conftest import require_shared

from UniversalSegLib.taxonomy import (
    ANATOMIC_REGION_CONTEXT,
    DICOM_MASTER_CONTEXT,
    GENERAL_ANATOMY_CONTEXT,
    UNIVERSALSEG_CONTEXT,
    ClassInfo,
    CodedTerm,
    Taxonomy,
    TaxonomyError,
    Terminology,
    UnknownClassError,
    get_taxonomy,
)

TAXONOMY = get_taxonomy()
RIGHT = CodedTerm("SCT", "24028007", "Right")
LEFT = CodedTerm("SCT", "7771000", "Left")
MORPHOLOGICALLY_ALTERED = "49755003"
TRIPLET = re.compile(r"^([^^~]*)\^([^^~]*)\^([^^~]*)$")


def names(classes):
    return [info.display_name for info in classes]


# ---------------------------------------------------------------------------------------------- order


def test_classes_follow_the_official_order_and_prompts():
    fixture = json.loads(require_shared("reference/fixture/class_names.json").read_text())["classes"]
    assert len(TAXONOMY) == len(fixture) == 32
    assert [info.index for info in TAXONOMY] == [entry["index"] for entry in fixture]
    for info, entry in zip(TAXONOMY, fixture):
        assert TAXONOMY[entry["index"]] is info
        assert info.channel == entry["channel"] == info.index - 1
        # The released CLIP embeddings were computed from these exact strings (typos included).
        assert info.prompt_name == entry["clip_prompt_name"]
        assert info.prompt == entry["clip_prompt"]
        assert info.official_name == entry["official_utils_name"]
        # Every spelling in circulation (README, utils, prompt) resolves to the class itself.
        for spelling in (entry["name"], entry["official_utils_name"], entry["clip_prompt_name"]):
            assert TAXONOMY.resolve(spelling) == [info], spelling


def test_display_names_are_spelled_correctly_while_official_typos_are_kept():
    assert TAXONOMY.by_key("aorta").display_name == "Aorta"
    assert TAXONOMY.by_key("aorta").prompt_name == "Arota"
    assert TAXONOMY.by_key("celiac_trunk").display_name == "Celiac Trunk"
    assert TAXONOMY.by_key("celiac_trunk").official_name == "Celiac Truck"
    assert TAXONOMY.by_key("inferior_vena_cava").display_name == "Inferior Vena Cava"
    assert TAXONOMY.by_key("gallbladder").display_name == "Gallbladder"
    assert TAXONOMY.by_key("left_femoral_head").display_name == "Left Femoral Head"
    typo = re.compile(r"\b(Arota|Truck|Postcava|Gall Bladder)\b")
    assert not [info.display_name for info in TAXONOMY if typo.search(info.display_name)]


def test_keys_and_display_names_are_unique():
    assert len({info.key for info in TAXONOMY}) == 32
    assert len({info.display_name.lower() for info in TAXONOMY}) == 32


# ---------------------------------------------------------------------------------------------- terminology


@pytest.mark.parametrize("info", list(TAXONOMY), ids=lambda info: info.key)
def test_every_class_has_a_valid_slicer_terminology_string(info):
    text = info.terminology.to_slicer_string()
    parts = text.split("~")
    assert len(parts) == 7
    # types in neither Slicer list live in the extension's own context (the module loads its .term.json)
    assert parts[0] in (GENERAL_ANATOMY_CONTEXT, DICOM_MASTER_CONTEXT, UNIVERSALSEG_CONTEXT)
    assert parts[4] == ANATOMIC_REGION_CONTEXT
    for part in (parts[1], parts[2], parts[3], parts[5], parts[6]):
        assert TRIPLET.match(part), part
    assert parts[1].startswith("SCT^") and parts[2].startswith("SCT^")
    assert Terminology.from_slicer_string(text) == info.terminology
    # A sourced statement for every code and for the colour.
    assert {"category", "type", "color"} <= set(info.sources)
    if info.terminology.type_modifier:
        assert "type_modifier" in info.sources
    if info.terminology.region:
        assert "region" in info.sources


def test_laterality_matches_the_type_modifier():
    paired = [info for info in TAXONOMY if info.laterality]
    assert sorted(info.key for info in paired) == sorted([
        "right_kidney", "left_kidney", "right_adrenal_gland", "left_adrenal_gland", "right_lung", "left_lung",
        "left_femoral_head", "right_femoral_head"])
    for info in TAXONOMY:
        expected = {"right": RIGHT, "left": LEFT, None: None}[info.laterality]
        assert info.terminology.type_modifier == expected, info.key
        if info.laterality:
            assert info.display_name.lower().startswith(info.laterality)


def test_lesions_have_a_parent_organ_and_the_organ_as_region():
    lesions = [info for info in TAXONOMY if info.is_lesion]
    assert [info.index for info in lesions] == list(range(26, 33))
    for info in lesions:
        assert info.parent is not None and info.parent == info.parent_organs[0]
        assert info.terminology.category.value == MORPHOLOGICALLY_ALTERED
        assert info.terminology.region is not None
        for parent_index in info.parent_organs:
            parent = TAXONOMY[parent_index]
            assert not parent.is_lesion
            # The region is the parent's own anatomy (the hepatic vessels carry the liver as their region).
            assert info.terminology.region.value in (parent.terminology.type.value,
                                                     getattr(parent.terminology.region, "value", None))
    assert TAXONOMY.by_key("liver_tumor").parent == TAXONOMY.by_key("liver").index
    assert TAXONOMY.by_key("kidney_cyst").parent_organs == (2, 3)
    assert all(info.parent is None for info in TAXONOMY if not info.is_lesion)


def _conventions_table_rows():
    """Rows of the 'Anatomical Structure' table in section e.4 of the Slicer conventions reference."""
    text = require_shared("reference/slicer-extension-conventions.md").read_text(encoding="utf-8")
    section = text.split("### e.4", 1)[1].split("**Tumors and lesions**", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"\**\d+\**", cells[1]):
            structure, code, meaning, _label, rgb = cells
            color = tuple(int(v) for v in rgb.split(",")) if re.fullmatch(r"\d+,\d+,\d+", rgb) else None
            rows.append((structure, code.strip("*"), meaning.split(" (")[0], color))
    return rows


#: Classes that deliberately differ from Slicer's recommended colour: Slicer gives both kidneys one colour
#: and the stomach nearly the liver's.
OWN_COLOURS = {"left_kidney", "stomach"}


def test_codes_and_colours_match_slicers_anatomy_lists():
    rows = _conventions_table_rows()
    assert len(rows) >= 14
    checked = 0
    for structure, code, meaning, color in rows:
        if structure == "Portal vein":
            # Our class is portal AND splenic vein: it uses the combined SNOMED concept on purpose.
            assert TAXONOMY.by_key("portal_and_splenic_vein").terminology.type.value == "110765007"
            continue
        for info in TAXONOMY.resolve(structure):  # "Kidney" resolves to both kidneys
            assert info.terminology.type == CodedTerm("SCT", code, meaning), structure
            if color is not None:
                assert info.terminology.context == GENERAL_ANATOMY_CONTEXT, structure
                if info.key in OWN_COLOURS:  # Slicer's colour would make two classes look alike
                    assert info.color != color and info.sources["color"].startswith("own choice"), structure
                else:
                    assert info.color == color, structure
            checked += 1
    assert checked >= 15


# ---------------------------------------------------------------------------------------------- colours


def test_colours_are_in_range_and_distinct_except_mirror_pairs():
    by_color = {}
    for info in TAXONOMY:
        assert len(info.color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in info.color)
        by_color.setdefault(info.color, []).append(info)
    for shared in by_color.values():
        if len(shared) > 1:
            # Only left/right twins may share a colour (the femoral heads, as in Slicer; not the kidneys).
            assert len(shared) == 2, names(shared)
            first, second = shared
            assert {first.laterality, second.laterality} == {"left", "right"}
            assert first.terminology.type == second.terminology.type


def test_neighbouring_organs_are_told_apart_by_colour():
    assert math.dist(TAXONOMY.by_key("left_kidney").color, TAXONOMY.by_key("right_kidney").color) > 60
    assert math.dist(TAXONOMY.by_key("liver").color, TAXONOMY.by_key("stomach").color) > 100


def test_lesion_colours_stand_out_from_their_organ():
    for info in TAXONOMY:
        for parent_index in info.parent_organs:
            distance = math.dist(info.color, TAXONOMY[parent_index].color)
            assert distance > 100, (info.display_name, TAXONOMY[parent_index].display_name, distance)


# ---------------------------------------------------------------------------------------------- resolver


@pytest.mark.parametrize("text, key", [
    ("IVC", "inferior_vena_cava"), ("postcava", "inferior_vena_cava"),
    ("vena cava inferior", "inferior_vena_cava"), ("Inferior Vena Cava", "inferior_vena_cava"),
    ("gallbladder", "gallbladder"), ("gall bladder", "gallbladder"), ("GB", "gallbladder"),
    ("kidney tumour", "kidney_tumor"), ("renal tumor", "kidney_tumor"), ("Renal Tumour", "kidney_tumor"),
    ("RCC", "kidney_tumor"), ("liver lesion", "liver_tumor"), ("hepatic tumour", "liver_tumor"),
    ("HCC", "liver_tumor"), ("PDAC", "pancreas_tumor"), ("pancreatic tumor", "pancreas_tumor"),
    ("small bowel", "intestine"), ("small intestine", "intestine"), ("urinary bladder", "bladder"),
    ("oesophagus", "esophagus"), ("coeliac trunk", "celiac_trunk"), ("celiac axis", "celiac_trunk"),
    ("portal vein", "portal_and_splenic_vein"), ("splenic vein", "portal_and_splenic_vein"),
    ("femur head left", "left_femoral_head"), ("head of femur left", "left_femoral_head"),
    ("Left Head of Femur", "left_femoral_head"), ("right femoral head", "right_femoral_head"),
    ("L kidney", "left_kidney"), ("left kidney", "left_kidney"), ("kidney (right)", "right_kidney"),
    ("rt lung", "right_lung"), ("adrenal_gland_left", "left_adrenal_gland"), ("renal cyst", "kidney_cyst"),
    ("hepatic vessels", "hepatic_vessel"), ("liver tumors", "liver_tumor"),
])
def test_synonyms_resolve_to_one_class(text, key):
    assert TAXONOMY.resolve(text) == [TAXONOMY.by_key(key)]


def test_case_spacing_and_spelling_variants_are_equivalent():
    expected = [TAXONOMY.by_key("liver_tumor")]
    for text in ("liver tumor", "LIVER TUMOR", "  Liver   Tumour ", "liver-tumor", "liver_tumour", "Liver.Tumor"):
        assert TAXONOMY.resolve(text) == expected, text


@pytest.mark.parametrize("text, keys", [
    ("kidneys", ["right_kidney", "left_kidney"]),
    ("kidney", ["right_kidney", "left_kidney"]),  # no side given: both kidneys
    ("lungs", ["right_lung", "left_lung"]),
    ("adrenal glands", ["right_adrenal_gland", "left_adrenal_gland"]),
    ("adrenals", ["right_adrenal_gland", "left_adrenal_gland"]),
    ("femoral heads", ["left_femoral_head", "right_femoral_head"]),
    ("kidney lesions", ["kidney_tumor", "kidney_cyst"]),
])
def test_anatomical_groups(text, keys):
    assert TAXONOMY.resolve(text) == [TAXONOMY.by_key(key) for key in keys]


def test_kind_groups():
    kinds = {info.index: info.kind for info in TAXONOMY}
    assert TAXONOMY.resolve("all") == list(TAXONOMY)
    assert [i.index for i in TAXONOMY.resolve("All Organs")] == [i for i, k in kinds.items() if k == "organ"]
    assert [i.index for i in TAXONOMY.resolve("all vessels")] == [8, 9, 10, 15, 25]
    tumors = [i for i, k in kinds.items() if k == "tumor"]
    assert [i.index for i in TAXONOMY.resolve("all tumors")] == tumors == list(range(26, 32))
    assert TAXONOMY.resolve("all tumours") == TAXONOMY.resolve("all tumors")
    assert [i.index for i in TAXONOMY.resolve("all lesions")] == list(range(26, 33))
    abdominal = TAXONOMY.resolve("abdominal organs")
    assert abdominal and all(info.kind == "organ" for info in abdominal)
    assert TAXONOMY.by_key("liver") in abdominal and TAXONOMY.by_key("left_lung") not in abdominal
    groups = TAXONOMY.groups()
    assert groups["kidneys"] == [2, 3] and groups["all"] == list(range(1, 33))


def test_lists_come_back_in_taxonomy_order_without_duplicates():
    result = TAXONOMY.resolve("liver tumor, IVC; kidneys, Liver, liver")
    assert [info.index for info in result] == [2, 3, 6, 9, 27]
    assert TAXONOMY.resolve(["pancreas tumour", "spleen, pancreas", "Spleen"]) == [
        TAXONOMY[1], TAXONOMY[11], TAXONOMY[28]]
    assert TAXONOMY.resolve("all organs, liver") == TAXONOMY.resolve("all organs")


def test_unknown_text_raises_with_suggestions():
    with pytest.raises(UnknownClassError) as caught:
        TAXONOMY.resolve("liver, livr")
    assert isinstance(caught.value, ValueError)
    assert '"livr"' in str(caught.value) and "Did you mean" in str(caught.value)
    assert caught.value.query == "livr"
    assert caught.value.suggestions[0] == "liver"
    assert 1 <= len(caught.value.suggestions) <= 5

    with pytest.raises(UnknownClassError) as caught:
        TAXONOMY.resolve("pancreas tumr")
    assert "pancreas tumor" in caught.value.suggestions


@pytest.mark.parametrize("text", ["kidney stone", "kidney stones", "left kidney tumor", "brain", "vena cava"])
def test_texts_that_name_no_class_are_refused(text):
    with pytest.raises(UnknownClassError):
        TAXONOMY.resolve(text)


@pytest.mark.parametrize("query", ["", "   ", " , ; ", []])
def test_empty_query_is_an_error(query):
    with pytest.raises(UnknownClassError, match="empty"):
        TAXONOMY.resolve(query)


def test_non_text_query_is_a_type_error():
    with pytest.raises(TypeError):
        TAXONOMY.resolve(["liver", 6])
    with pytest.raises(TypeError):
        TAXONOMY.resolve(6)


def test_lookup_by_index_and_key_errors_are_clear():
    assert TAXONOMY[6].key == "liver" and TAXONOMY.by_key("liver").index == 6
    with pytest.raises(KeyError, match="1..32"):
        TAXONOMY[0]
    with pytest.raises(KeyError, match="resolve"):
        TAXONOMY.by_key("Liver")


# ---------------------------------------------------------------------------------------------- serialisation


def test_json_round_trip_with_an_extra_class():
    spinal_cord = ClassInfo.from_dict({"index": 33, "display_name": "Spinal Cord"})
    assert spinal_cord.key == "spinal_cord" and spinal_cord.kind == "organ" and spinal_cord.channel == 32
    assert spinal_cord.prompt == "A computerized tomography of a Spinal Cord"
    assert spinal_cord.terminology.type == CodedTerm("SCT", "85756007", "Tissue")
    assert spinal_cord.terminology.context == GENERAL_ANATOMY_CONTEXT
    assert spinal_cord.color not in {info.color for info in TAXONOMY}

    extended = TAXONOMY.extended([spinal_cord])
    assert len(extended) == 33 and extended[33] == spinal_cord
    assert extended.resolve("spinal cord") == [spinal_cord]
    assert spinal_cord in extended.resolve("all organs")

    reloaded = Taxonomy.from_json(extended.to_json())
    assert reloaded == extended
    assert [info.to_dict() for info in reloaded] == [info.to_dict() for info in extended]
    assert reloaded.groups() == extended.groups()
    assert Taxonomy.from_dict(json.loads(TAXONOMY.to_json())) == TAXONOMY


def test_groups_need_all_their_members():
    subset = Taxonomy([TAXONOMY.by_key("liver"), TAXONOMY.by_key("right_kidney")])
    assert subset.resolve("all organs") == [TAXONOMY.by_key("right_kidney"), TAXONOMY.by_key("liver")]
    with pytest.raises(UnknownClassError):
        subset.resolve("kidneys")  # only one kidney: the group is not offered


def test_bad_class_tables_are_refused_with_clear_errors():
    liver = TAXONOMY.by_key("liver").to_dict()
    with pytest.raises(TaxonomyError, match="color"):
        ClassInfo.from_dict({**liver, "color": [300, 0, 0]})
    with pytest.raises(TaxonomyError, match="kind"):
        ClassInfo.from_dict({**liver, "kind": "bone"})
    with pytest.raises(TaxonomyError, match="unknown fields"):
        ClassInfo.from_dict({**liver, "colour": [1, 2, 3]})
    with pytest.raises(TaxonomyError, match="used twice"):
        Taxonomy([TAXONOMY.by_key("liver"), ClassInfo.from_dict({**liver, "key": "liver_copy"})])
    clash = ClassInfo.from_dict({"index": 40, "display_name": "Hepatic Mass", "synonyms": ["liver"]})
    with pytest.raises(TaxonomyError, match="would mean both"):
        TAXONOMY.extended([clash])
    with pytest.raises(TaxonomyError, match="7"):
        Terminology.from_slicer_string("SCT^1^a~SCT^2^b")


# ---------------------------------------------------------------------------------------------- slicer-core


def test_slicer_reads_the_terminology_strings_back():
    slicer = pytest.importorskip("slicer", reason="slicer-core wheel not installed")
    # Our default terminology for new classes is the one Slicer gives a new segment.
    default = ClassInfo.from_dict({"index": 99, "display_name": "Something New"}).terminology
    assert default.to_slicer_string() == slicer.vtkSegment().GetTerminology()

    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    for info in TAXONOMY:
        text = info.terminology.to_slicer_string()
        segment = slicer.vtkSegment()
        segment.SetName(info.display_name)
        segment.SetTag(segment.GetTerminologyEntryTagName(), text)
        assert segment.GetTerminology() == text

        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(segment.GetTerminology(), entry)
        assert entry.GetTerminologyContextName() == info.terminology.context
        assert entry.GetRegionContextName() == info.terminology.region_context
        read_back = {
            "category": entry.GetCategoryObject(), "type": entry.GetTypeObject(),
            "type_modifier": entry.GetTypeModifierObject(), "region": entry.GetRegionObject(),
            "region_modifier": entry.GetRegionModifierObject(),
        }
        for part, obj in read_back.items():
            ours = getattr(info.terminology, part)
            got = (obj.GetCodingSchemeDesignator(), obj.GetCodeValue(), obj.GetCodeMeaning())
            assert got == ((ours.scheme, ours.value, ours.meaning) if ours else (None, None, None)), (info.key, part)
        assert logic.SerializeTerminologyEntry(entry) == text

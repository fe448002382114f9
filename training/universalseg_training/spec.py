"""Declarative dataset specifications: how one dataset's label maps map onto the UniversalSeg taxonomy.

A dataset is described by a small YAML or JSON file. Two kinds exist.

**Image + label-map datasets** (public datasets, in-house collections)::

    name: kits                       # dataset key (uniform sampling, reports)
    root: /data/KiTS                 # optional; relative paths are relative to the spec file's folder
    images: imagesTr/*.nii.gz        # a glob ...
    labels: labelsTr/{name}          # ... and where each image's label map is ({name}, {stem}, {id})
    # or: cases: [{id: case_00000, image: imagesTr/a.nii.gz, labels: labelsTr/a.nii.gz}, ...]
    classes:                         # raw label value -> taxonomy class (index or name); null = drop
      1: kidney                      # names a left/right pair: split by the patient side of each component
      2: kidney tumor
      3: kidney cyst
    annotated: [kidneys, kidney tumor, kidney cyst]   # optional; default: every class `classes` maps to
    absent: [liver tumor]            # optional: annotated classes no case has (healthy controls)
    unlisted: error                  # a raw value not in `classes`: error (default) or drop (background)
    lesions_in_organs: true          # organ channels include their lesions (taxonomy parent organs)
    includes: {liver: [hepatic vessel]}   # optional extra merges: organ includes other classes
    label_names: {file: class_map.json, key: total}   # optional raw value -> raw name table, so that
                                     # `classes` can be keyed by raw names (e.g. TotalSegmentator's)
    sampling: {crops: pos_neg, zoom: false}   # training crops of this dataset (see below)
    subsets: [{case_number_at_least: 60, annotated: [spleen, liver]}]   # optional per-case annotations
    preset: kits                     # optional: start from a public dataset's preset (:mod:`.presets`)

``sampling``: ``crops: pos_neg`` (default) draws crops centred on a labelled voxel or on any voxel 2:1;
``crops: lesions`` draws background:organ:lesion 1:1:5 (the official choice for LiTS and the MSD liver,
pancreas and hepatic-vessel tasks); ``zoom: true`` adds the random zoom of the official MSD tasks.
``subsets``: the first entry whose rule matches a case (``match``: a regular expression searched in the
case id; ``case_number_at_least``: the trailing number of the case id) replaces ``annotated`` for that
case. Label path templates may use ``{name}`` (image file name), ``{stem}``/``{id}`` (without extension)
and ``{digits}`` (the trailing digits of the stem, e.g. 0001 of img0001).

Every class listed in ``annotated`` is supervised in this dataset; every other class is UNKNOWN (masked
out of the loss), never background. A left/right pair is written either as a name that resolves to the pair
("kidney", "lungs", "adrenal gland") or explicitly ``{right: right kidney, left: left kidney}``.

**Training-case datasets** (cases exported from 3D Slicer, ``*.case.json``; each case says itself which
classes are annotated)::

    name: reviewed_in_slicer
    case_files: exports/*.case.json

**Corrected pseudo-labels of a batch** (``universalseg batch -o OUT``, then "Export for training" of the
reviewed cases, which writes ``OUT/<case>/corrected/<case>.case.json``; see :mod:`UniversalSegLib.batch.corrections`)::

    name: corrected_pseudo_labels
    batch: /data/pseudo-labels/OUT    # every exported case of the batch; cases not yet reviewed are skipped
"""
from __future__ import annotations

import glob
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from UniversalSegLib.taxonomy import Taxonomy, UnknownClassError, get_taxonomy

__all__ = ["CaseFiles", "DatasetSpec", "DatasetSpecError", "LabelTarget", "load_dataset_spec"]

_KNOWN_KEYS = {"name", "root", "images", "labels", "cases", "case_files", "classes", "annotated", "unlisted",
               "lesions_in_organs", "includes", "label_names", "description", "sampling", "subsets", "preset",
               "absent", "batch"}
CROP_MODES = ("pos_neg", "lesions")


class DatasetSpecError(ValueError):
    """A dataset specification is invalid; the message names the spec and the entry."""


@dataclass(frozen=True)
class LabelTarget:
    """What one raw label value becomes: one class, a (right, left) pair split by patient side, or nothing."""

    classes: tuple[int, ...]
    split: bool = False

    @property
    def dropped(self) -> bool:
        return not self.classes


@dataclass(frozen=True)
class CaseFiles:
    """One case of a dataset: an image and its label map, or a ``.case.json`` training case."""

    case_id: str
    image: Path | None = None
    labels: Path | None = None
    case_json: Path | None = None


@dataclass
class DatasetSpec:
    """A validated dataset specification (see the module docstring for the file format)."""

    name: str
    cases: list[CaseFiles]
    targets: dict[int, LabelTarget] = field(default_factory=dict)
    annotated: tuple[int, ...] = ()
    unlisted: str = "error"
    lesions_in_organs: bool = True
    includes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    taxonomy: Taxonomy = field(default_factory=get_taxonomy)
    source: str = "<dict>"
    crops: str = "pos_neg"
    zoom: bool = False
    subsets: tuple[tuple[str | None, int | None, tuple[int, ...]], ...] = ()
    preset: str | None = None

    def annotated_for(self, case_id: str) -> tuple[int, ...]:
        """The classes annotated in case ``case_id`` (a matching ``subsets`` entry, else ``annotated``)."""
        for pattern, at_least, annotated in self.subsets:
            if pattern is not None and re.search(pattern, case_id):
                return annotated
            if at_least is not None:
                digits = re.search(r"(\d+)$", case_id)
                if digits and int(digits.group(1)) >= at_least:
                    return annotated
        return self.annotated

    @property
    def is_case_format(self) -> bool:
        """True when the cases are ``.case.json`` training cases (annotations per case)."""
        return bool(self.cases) and self.cases[0].case_json is not None

    def fingerprint(self) -> str:
        """A short hash of everything that changes the harmonised labels (for cache invalidation)."""
        payload = {
            "targets": {str(k): [list(v.classes), v.split] for k, v in sorted(self.targets.items())},
            "annotated": list(self.annotated), "unlisted": self.unlisted,
            "lesions_in_organs": self.lesions_in_organs,
            "includes": {str(k): list(v) for k, v in sorted(self.includes.items())},
            "taxonomy": [c.key for c in self.taxonomy],
            "subsets": [[p, n, list(a)] for p, n, a in self.subsets],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: str | Path = ".", taxonomy: Taxonomy | None = None,
                  source: str = "<dict>") -> "DatasetSpec":
        return _parse(data, Path(base_dir), taxonomy or get_taxonomy(), source)


def load_dataset_spec(path: str | Path, taxonomy: Taxonomy | None = None) -> DatasetSpec:
    """Read a ``.yaml``/``.yml``/``.json`` dataset specification."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetSpecError(f"dataset specification {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as error:  # yaml.YAMLError / json.JSONDecodeError
        raise DatasetSpecError(f"dataset specification {path} cannot be parsed: {error}") from None
    if not isinstance(data, Mapping):
        raise DatasetSpecError(f"dataset specification {path} must be a mapping (name, classes, cases...).")
    return DatasetSpec.from_dict(data, path.parent, taxonomy, str(path))


# ----------------------------------------------------------------------------------------------- parsing
def _fail(source: str, message: str) -> DatasetSpecError:
    return DatasetSpecError(f"dataset specification {source}: {message}")


def _resolve_one(value: Any, taxonomy: Taxonomy, source: str, where: str) -> list[int]:
    """Class indices named by an index or a name (names go through the taxonomy's resolver)."""
    if isinstance(value, bool):
        raise _fail(source, f"{where}: {value!r} is not a class")
    if isinstance(value, int):
        if value not in taxonomy.indices:
            raise _fail(source, f"{where}: class index {value} is not in the taxonomy ({taxonomy.indices[0]}..{taxonomy.indices[-1]})")
        return [value]
    if isinstance(value, str):
        try:
            return [info.index for info in taxonomy.resolve(value)]
        except UnknownClassError as error:
            raise _fail(source, f"{where}: {error}") from None
    raise _fail(source, f"{where}: expected a class name or index, got {value!r}")


def _lateral_pair(indices: Sequence[int], taxonomy: Taxonomy) -> tuple[int, int] | None:
    """(right, left) if the indices are exactly one right and one left class, else None."""
    if len(indices) != 2:
        return None
    sides = {taxonomy[i].laterality: i for i in indices}
    if set(sides) == {"right", "left"}:
        return sides["right"], sides["left"]
    return None


def _parse_target(value: Any, taxonomy: Taxonomy, source: str, where: str) -> LabelTarget:
    if value is None:
        return LabelTarget(())
    if isinstance(value, Mapping):
        if set(value) != {"right", "left"}:
            raise _fail(source, f"{where}: an explicit split needs exactly the keys 'right' and 'left', got {sorted(value)}")
        right = _resolve_one(value["right"], taxonomy, source, where)
        left = _resolve_one(value["left"], taxonomy, source, where)
        if len(right) != 1 or len(left) != 1 or right == left:
            raise _fail(source, f"{where}: 'right' and 'left' must each name one (different) class")
        return LabelTarget((right[0], left[0]), split=True)
    indices = _resolve_one(value, taxonomy, source, where)
    if len(indices) == 1:
        return LabelTarget((indices[0],))
    pair = _lateral_pair(indices, taxonomy)
    if pair is not None:
        return LabelTarget(pair, split=True)
    names = ", ".join(taxonomy[i].display_name for i in indices)
    raise _fail(source, f"{where}: {value!r} means several classes ({names}); one raw label can only become one "
                        "class or a right/left pair")


def _raw_key(key: Any, names: Mapping[str, int], source: str) -> int:
    if isinstance(key, bool):
        raise _fail(source, f"classes: {key!r} is not a raw label value")
    if isinstance(key, int):
        return key
    if isinstance(key, str):
        text = key.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        if text in names:
            return names[text]
        hint = " (add label_names to map raw names to values)" if not names else ""
        raise _fail(source, f"classes: raw label {key!r} is neither a number nor a name of label_names{hint}")
    raise _fail(source, f"classes: {key!r} is not a raw label value")


def _label_names(value: Any, base: Path, source: str) -> dict[str, int]:
    """Raw name -> raw value, from an inline table {value: name} or {file: ..., key: ...}."""
    if value is None:
        return {}
    table = value
    if isinstance(value, Mapping) and "file" in value:
        path = (base / str(value["file"])).expanduser()
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise _fail(source, f"label_names: cannot read {path}: {error}") from None
        if value.get("key") is not None:
            if value["key"] not in table:
                raise _fail(source, f"label_names: {path} has no key {value['key']!r} (keys: {', '.join(table)})")
            table = table[value["key"]]
    if not isinstance(table, Mapping):
        raise _fail(source, "label_names must map raw values to raw names")
    names = {}
    for raw, name in table.items():
        try:
            names[str(name)] = int(raw)
        except (TypeError, ValueError):
            raise _fail(source, f"label_names: {raw!r} is not an integer label value") from None
    return names


def _paired_cases(data: Mapping[str, Any], root: Path, source: str) -> list[CaseFiles]:
    if "cases" in data:
        cases = []
        for n, entry in enumerate(data["cases"] or []):
            if not isinstance(entry, Mapping) or "image" not in entry or "labels" not in entry:
                raise _fail(source, f"cases[{n}] needs 'image' and 'labels'")
            image = root / str(entry["image"])
            case_id = str(entry.get("id") or _stem(image))
            cases.append(CaseFiles(case_id, image, root / str(entry["labels"])))
        return cases
    if "images" not in data or "labels" not in data:
        raise _fail(source, "give either 'cases' (a list of image/labels pairs) or 'images' (a glob) and 'labels' "
                            "(a path template such as labelsTr/{name}), or 'case_files' for exported training cases")
    template = str(data["labels"])
    cases = []
    for image in sorted(Path(p) for p in glob.glob(str(root / str(data["images"])))):
        stem = _stem(image)
        digits = re.search(r"(\d*)$", stem).group(1)
        try:
            labels = root / template.format(name=image.name, stem=stem, id=stem, digits=digits)
        except (KeyError, IndexError) as error:
            raise _fail(source, f"labels: unknown placeholder {error} in {template!r} (use {{name}}, {{stem}}, "
                                "{id} or {digits})") from None
        cases.append(CaseFiles(stem, image, labels))
    return cases


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".case.json"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _with_preset(data: Mapping[str, Any], source: str) -> dict:
    """``data`` on top of the preset it names (its own entries win)."""
    from .presets import preset

    try:
        merged = preset(str(data["preset"]))
    except KeyError as error:
        raise _fail(source, str(error.args[0])) from None
    merged.update({k: v for k, v in data.items() if k != "preset"})
    merged["preset"] = data["preset"]
    return merged


def _sampling(value: Any, source: str) -> tuple[str, bool]:
    value = dict(value or {})
    unknown = set(value) - {"crops", "zoom"}
    if unknown:
        raise _fail(source, f"sampling: unknown entries {sorted(unknown)} (known: crops, zoom)")
    crops = str(value.get("crops", "pos_neg"))
    if crops not in CROP_MODES:
        raise _fail(source, f"sampling.crops must be one of {', '.join(CROP_MODES)}; got {crops!r}")
    zoom = value.get("zoom", False)
    if not isinstance(zoom, bool):
        raise _fail(source, f"sampling.zoom must be true or false; got {zoom!r}")
    return crops, zoom


def _subsets(value: Any, taxonomy: Taxonomy, source: str) -> tuple:
    subsets = []
    for n, entry in enumerate(value or []):
        if not isinstance(entry, Mapping) or "annotated" not in entry or \
                len({"match", "case_number_at_least"} & set(entry)) != 1:
            raise _fail(source, f"subsets[{n}] needs 'annotated' and one of 'match' (a regular expression of case "
                                "ids) or 'case_number_at_least'")
        listed = entry["annotated"]
        listed = [listed] if isinstance(listed, (str, int)) else listed
        annotated = tuple(sorted({i for item in listed for i in _resolve_one(item, taxonomy, source, f"subsets[{n}]")}))
        at_least = entry.get("case_number_at_least")
        subsets.append((entry.get("match"), None if at_least is None else int(at_least), annotated))
    return tuple(subsets)


def _parse(data: Mapping[str, Any], base: Path, taxonomy: Taxonomy, source: str) -> DatasetSpec:
    if data.get("preset") is not None:
        data = _with_preset(data, source)
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise _fail(source, f"unknown entries {sorted(unknown)} (known: {', '.join(sorted(_KNOWN_KEYS))})")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail(source, "'name' (the dataset key) is required")
    root = (base / str(data.get("root", "."))).expanduser()

    if "case_files" in data and "batch" in data:
        raise _fail(source, "give either 'case_files' or 'batch', not both")
    if "batch" in data:
        from UniversalSegLib.batch.corrections import exported_corrections
        from UniversalSegLib.errors import InputNotFoundError

        try:
            files = exported_corrections(root / str(data["batch"]))
        except InputNotFoundError as error:
            raise _fail(source, str(error)) from None
        cases = [CaseFiles(p.parent.parent.name, case_json=p) for p in files]  # OUT/<case>/corrected/
        if not cases:
            raise _fail(source, f"batch {root / str(data['batch'])} has no case exported for training yet "
                                "(Export for training writes OUT/<case>/corrected/<case>.case.json)")
        crops, zoom = _sampling(data.get("sampling"), source)
        return DatasetSpec(name=name, cases=cases, taxonomy=taxonomy, source=source, crops=crops, zoom=zoom)
    if "case_files" in data:
        files = sorted(Path(p) for p in glob.glob(str(root / str(data["case_files"]))))
        cases = [CaseFiles(_stem(p), case_json=p) for p in files]
        if not cases:
            raise _fail(source, f"case_files {data['case_files']!r} matches no file under {root}")
        crops, zoom = _sampling(data.get("sampling"), source)
        return DatasetSpec(name=name, cases=cases, taxonomy=taxonomy, source=source, crops=crops, zoom=zoom)

    if "classes" not in data or not isinstance(data["classes"], Mapping) or not data["classes"]:
        raise _fail(source, "'classes' (raw label value -> taxonomy class) is required")
    names = _label_names(data.get("label_names"), base, source)
    targets: dict[int, LabelTarget] = {}
    for key, value in data["classes"].items():
        raw = _raw_key(key, names, source)
        if raw == 0:
            raise _fail(source, "classes: raw value 0 is the background and cannot be mapped")
        if raw in targets:
            raise _fail(source, f"classes: raw value {raw} is listed twice")
        targets[raw] = _parse_target(value, taxonomy, source, f"classes[{key}]")

    mapped = sorted({i for t in targets.values() for i in t.classes})
    if data.get("annotated") is None:
        annotated = tuple(mapped)
    else:
        listed = data["annotated"]
        if isinstance(listed, (str, int)):
            listed = [listed]
        annotated = tuple(sorted({i for item in listed for i in _resolve_one(item, taxonomy, source, "annotated")}))
    unlisted = str(data.get("unlisted", "error"))
    if unlisted not in ("error", "drop"):
        raise _fail(source, f"unlisted must be 'error' or 'drop', got {unlisted!r}")

    includes: dict[int, tuple[int, ...]] = {}
    for organ, members in (data.get("includes") or {}).items():
        organ_indices = _resolve_one(organ, taxonomy, source, "includes")
        if isinstance(members, (str, int)):
            members = [members]
        member_indices = tuple(sorted({i for m in members for i in _resolve_one(m, taxonomy, source, f"includes[{organ}]")}))
        for index in organ_indices:
            includes[index] = tuple(sorted(set(includes.get(index, ())) | set(member_indices)))

    cases = _paired_cases(data, root, source)
    if not cases:
        raise _fail(source, f"no cases found (root {root})")
    absent = data.get("absent") or []
    absent = [absent] if isinstance(absent, (str, int)) else absent
    absent = {i for item in absent for i in _resolve_one(item, taxonomy, source, "absent")}
    annotated = tuple(sorted(set(annotated) | absent))
    included = {i for members in includes.values() for i in members}
    unmapped = [taxonomy[i].display_name for i in annotated if i not in mapped and i not in absent and i not in included]
    if unmapped:
        raise _fail(source, f"annotated lists {', '.join(unmapped)}, but no raw value in 'classes' maps to "
                            f"{'it' if len(unmapped) == 1 else 'them'}: such a class would train as background "
                            "everywhere. Map a raw value to it in 'classes', remove it from 'annotated', or, when the class is truly absent "
                            "from every case of this dataset (healthy controls), list it under 'absent'.")
    crops, zoom = _sampling(data.get("sampling"), source)
    return DatasetSpec(name=name, cases=cases, targets=targets, annotated=annotated, unlisted=unlisted,
                       lesions_in_organs=bool(data.get("lesions_in_organs", True)), includes=includes,
                       taxonomy=taxonomy, source=source, crops=crops, zoom=zoom,
                       subsets=_subsets(data.get("subsets"), taxonomy, source),
                       preset=None if data.get("preset") is None else str(data["preset"]))

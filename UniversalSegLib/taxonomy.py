"""The class taxonomy of UniversalSeg: the 32 official classes as data, plus a resolver for what people type.

The table itself lives in ``data/taxonomy.json`` (names, synonyms, kind, parent organ, laterality, colour,
DICOM/SNOMED CT terminology with the source of every code). This module only turns it into immutable
objects and answers questions about it::

    from UniversalSegLib.taxonomy import get_taxonomy
    taxonomy = get_taxonomy()
    taxonomy.resolve("IVC, kidneys, liver tumour")   # -> [Right Kidney, Left Kidney, Inferior Vena Cava, Liver Tumor]
    taxonomy[27].terminology.to_slicer_string()      # Slicer's 7-part TerminologyEntry string

Index is the 1-based official class id; the model output channel is ``index - 1``. A checkpoint can carry
its own class table (``Taxonomy.to_dict`` / ``Taxonomy.from_dict``), including classes that are not among
the 32; such classes get the Slicer default terminology "Tissue" and a generated colour unless given.
"""
from __future__ import annotations

import colorsys
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union
from .errors import InvalidArgumentTypeError, TaxonomyError, UnknownClassError

__all__ = [
    "ANATOMIC_REGION_CONTEXT",
    "DEFAULT_TAXONOMY",
    "DICOM_MASTER_CONTEXT",
    "UNIVERSALSEG_CONTEXT",
    "GENERAL_ANATOMY_CONTEXT",
    "KINDS",
    "KIND_PRIORITY",
    "POSTPROCESS_RULES",
    "PostprocessSpec",
    "PROMPT_TEMPLATE",
    "ClassInfo",
    "CodedTerm",
    "GroupSpec",
    "Taxonomy",
    "TaxonomyError",
    "Terminology",
    "UnknownClassError",
    "generate_color",
    "get_taxonomy",
]

TAXONOMY_FORMAT = "universalseg-taxonomy"
TAXONOMY_VERSION = 1
#: How a class name becomes the text the official model embedded with CLIP ("... of a liver").
PROMPT_TEMPLATE = "A computerized tomography of a {}"

KINDS = ("organ", "vessel", "tumor", "cyst")
LESION_KINDS = ("tumor", "cyst")
#: Where classes overlap in one label map, the class of the higher kind is shown: lesions inside vessels
#: inside organs (the label map, the phantom's partial labels and training's label maps all use this).
KIND_PRIORITY = {"organ": 1, "vessel": 2, "tumor": 3, "cyst": 3}
#: Post-processing rules a class can have (see :class:`PostprocessSpec` and :mod:`UniversalSegLib.postprocess`).
POSTPROCESS_RULES = ("keep", "largest_component", "vein_above_pancreas", "lung_pair", "inside_organ")
LATERALITIES = ("left", "right")

GENERAL_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER_CONTEXT = "Segmentation category and type - DICOM master list"
#: The context of the types in neither Slicer list (portal and splenic vein, femoral head): the Slicer module
#: ships it as a ``.term.json`` generated from the class table and loads it at start-up.
UNIVERSALSEG_CONTEXT = "Segmentation category and type - UniversalSeg"
ANATOMIC_REGION_CONTEXT = "Anatomic codes - DICOM master list"

_KEY_PATTERN = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
_MAX_SUGGESTIONS = 5


# --------------------------------------------------------------------------------------------------------
# Coded terms and terminology entries


@dataclass(frozen=True)
class CodedTerm:
    """One coded concept (DICOM code sequence item), e.g. ``CodedTerm("SCT", "10200004", "Liver")``."""

    scheme: str
    value: str
    meaning: str

    def __post_init__(self) -> None:
        for name in ("scheme", "value", "meaning"):
            part = getattr(self, name)
            if not isinstance(part, str) or not part.strip():
                raise TaxonomyError(f"coded term {self!r}: {name} must be a non-empty string")
            # '^' and '~' are the separators of Slicer's terminology string.
            if "^" in part or "~" in part:
                raise TaxonomyError(f"coded term {self!r}: {name} must not contain '^' or '~'")

    def slicer(self) -> str:
        """The ``scheme^value^meaning`` triplet used in Slicer's terminology string."""
        return f"{self.scheme}^{self.value}^{self.meaning}"

    def to_list(self) -> list:
        return [self.scheme, self.value, self.meaning]

    @classmethod
    def from_list(cls, items: Optional[Sequence[str]]) -> Optional["CodedTerm"]:
        if items is None:
            return None
        if len(items) != 3:
            raise TaxonomyError(f"a coded term needs [scheme, value, meaning], got {list(items)!r}")
        return cls(*(str(item) for item in items))

    @classmethod
    def from_slicer(cls, text: str) -> Optional["CodedTerm"]:
        """Parse ``scheme^value^meaning``; the empty triplet ``^^`` (or an empty string) gives None."""
        parts = text.split("^")
        if text == "" or parts == ["", "", ""]:
            return None
        if len(parts) != 3:
            raise TaxonomyError(f'"{text}" is not a coded term of the form scheme^value^meaning')
        return cls(*parts)


def _slicer_triplet(term: Optional[CodedTerm]) -> str:
    return term.slicer() if term is not None else "^^"


@dataclass(frozen=True)
class Terminology:
    """A standard terminology entry as 3D Slicer stores it in a segment's ``TerminologyEntry`` tag."""

    context: str
    category: CodedTerm
    type: CodedTerm
    type_modifier: Optional[CodedTerm] = None
    region_context: str = ANATOMIC_REGION_CONTEXT
    region: Optional[CodedTerm] = None
    region_modifier: Optional[CodedTerm] = None

    def to_slicer_string(self) -> str:
        """Slicer's 7-part ``~``-separated string: context~category~type~modifier~region context~region~modifier."""
        return "~".join([
            self.context, self.category.slicer(), self.type.slicer(), _slicer_triplet(self.type_modifier),
            self.region_context, _slicer_triplet(self.region), _slicer_triplet(self.region_modifier),
        ])

    @classmethod
    def from_slicer_string(cls, text: str) -> "Terminology":
        parts = text.split("~")
        if len(parts) != 7:
            raise TaxonomyError(f'"{text}" is not a Slicer terminology string: it needs 7 "~"-separated parts, '
                                f"found {len(parts)}")
        category, type_ = CodedTerm.from_slicer(parts[1]), CodedTerm.from_slicer(parts[2])
        if category is None or type_ is None:
            raise TaxonomyError(f'"{text}": a terminology entry needs a category and a type')
        return cls(parts[0], category, type_, CodedTerm.from_slicer(parts[3]), parts[4],
                   CodedTerm.from_slicer(parts[5]), CodedTerm.from_slicer(parts[6]))

    def to_dict(self) -> dict:
        return {
            "context": self.context,
            "category": self.category.to_list(),
            "type": self.type.to_list(),
            "type_modifier": self.type_modifier.to_list() if self.type_modifier else None,
            "region_context": self.region_context,
            "region": self.region.to_list() if self.region else None,
            "region_modifier": self.region_modifier.to_list() if self.region_modifier else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Terminology":
        try:
            return cls(
                context=str(data["context"]),
                category=CodedTerm.from_list(data["category"]),
                type=CodedTerm.from_list(data["type"]),
                type_modifier=CodedTerm.from_list(data.get("type_modifier")),
                region_context=str(data.get("region_context", ANATOMIC_REGION_CONTEXT)),
                region=CodedTerm.from_list(data.get("region")),
                region_modifier=CodedTerm.from_list(data.get("region_modifier")),
            )
        except KeyError as missing:
            raise TaxonomyError(f"terminology entry {dict(data)!r} lacks {missing}") from None


#: Slicer's default for a new segment (General Anatomy "Tissue"); used for classes without a terminology.
DEFAULT_TERMINOLOGY = Terminology(GENERAL_ANATOMY_CONTEXT, CodedTerm("SCT", "85756007", "Tissue"),
                                  CodedTerm("SCT", "85756007", "Tissue"))


def generate_color(key: str) -> Tuple[int, int, int]:
    """A stable, fairly saturated colour derived from a class key (for classes without a colour)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536.0
    saturation = 0.55 + 0.35 * digest[2] / 255.0
    red, green, blue = colorsys.hsv_to_rgb(hue, saturation, 0.92)
    return (round(red * 255), round(green * 255), round(blue * 255))


def _key_from_name(name: str) -> str:
    return "_".join(re.findall(r"[a-z0-9]+", name.lower()))


# --------------------------------------------------------------------------------------------------------
# One class


@dataclass(frozen=True)
class PostprocessSpec:
    """How a class's thresholded mask is cleaned up (the rules are implemented in
    :mod:`UniversalSegLib.postprocess`).

    ``rule``: one of :data:`POSTPROCESS_RULES`. ``reads``: keys of the classes whose raw predictions the rule
    reads besides the class itself (the pancreas for the vein, both lungs for the lung pair, the organs of a
    lesion). ``components``: for ``"inside_organ"``, how many largest components of those organs to keep.
    """

    rule: str = "keep"
    reads: Tuple[str, ...] = ()
    components: int = 1

    def __post_init__(self) -> None:
        if self.rule not in POSTPROCESS_RULES:
            raise TaxonomyError(f"post-processing rule {self.rule!r} is not one of {', '.join(POSTPROCESS_RULES)}")
        object.__setattr__(self, "reads", tuple(self.reads))

    def to_dict(self) -> dict:
        return {"rule": self.rule, "reads": list(self.reads), "components": self.components}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PostprocessSpec":
        return cls(rule=str(data.get("rule", "keep")), reads=tuple(data.get("reads") or ()),
                   components=int(data.get("components", 1)))


@dataclass(frozen=True)
class ClassInfo:
    """One class of the taxonomy. ``index`` is 1-based; the model channel is ``index - 1``."""

    index: int
    key: str
    display_name: str
    prompt_name: str
    official_name: str
    synonyms: Tuple[str, ...]
    kind: str
    parent: Optional[int]
    laterality: Optional[str]
    color: Tuple[int, int, int]
    terminology: Terminology
    #: More specific structures/diseases the class covers ("HCC" -> Liver Tumor); the resolver accepts them.
    narrower_terms: Tuple[str, ...] = ()
    #: Every organ that contains a lesion (official TUMOR_ORGAN); ``parent`` is the first of them.
    parent_organs: Tuple[int, ...] = ()
    #: How post-processing cleans up this class; None in class tables written before rules were data
    #: (post-processing then uses the official class of the same index and key, else keeps the mask).
    postprocess: Optional[PostprocessSpec] = None
    #: Where each code and the colour came from (informational; not compared).
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        where = f"class {self.index!r} ({self.display_name!r})"
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 1:
            raise TaxonomyError(f"{where}: index must be an integer >= 1 (1-based class id)")
        if not isinstance(self.key, str) or not _KEY_PATTERN.match(self.key):
            raise TaxonomyError(f"{where}: key {self.key!r} must be snake_case (e.g. 'liver_tumor')")
        for name in ("display_name", "prompt_name", "official_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise TaxonomyError(f"{where}: {name} must be a non-empty string")
        if self.kind not in KINDS:
            raise TaxonomyError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.laterality not in (None, *LATERALITIES):
            raise TaxonomyError(f"{where}: laterality {self.laterality!r} must be 'left', 'right' or None")
        color = tuple(self.color)
        if len(color) != 3 or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255
                                      for c in color):
            raise TaxonomyError(f"{where}: color {self.color!r} must be three integers 0..255")
        if not isinstance(self.terminology, Terminology):
            raise TaxonomyError(f"{where}: terminology must be a Terminology")
        parents = tuple(self.parent_organs) or ((self.parent,) if self.parent is not None else ())
        if parents and self.parent is not None and parents[0] != self.parent:
            raise TaxonomyError(f"{where}: parent {self.parent} must be the first of parent_organs {parents}")
        if self.index in parents:
            raise TaxonomyError(f"{where}: a class cannot be its own parent")
        # Frozen dataclass: normalise containers once, here.
        object.__setattr__(self, "color", color)
        object.__setattr__(self, "synonyms", tuple(self.synonyms))
        object.__setattr__(self, "narrower_terms", tuple(self.narrower_terms))
        object.__setattr__(self, "parent_organs", parents)
        object.__setattr__(self, "parent", parents[0] if parents else None)
        object.__setattr__(self, "sources", dict(self.sources))

    @property
    def channel(self) -> int:
        """Model output channel (0-based)."""
        return self.index - 1

    @property
    def prompt(self) -> str:
        """The official CLIP prompt ("A computerized tomography of a Arota" - typos kept on purpose)."""
        return PROMPT_TEMPLATE.format(self.prompt_name)

    @property
    def is_lesion(self) -> bool:
        return self.kind in LESION_KINDS

    @property
    def names(self) -> Tuple[str, ...]:
        """Every text that resolves to exactly this class."""
        return (self.key.replace("_", " "), self.display_name, self.prompt_name, self.official_name,
                *self.synonyms, *self.narrower_terms)

    def to_dict(self) -> dict:
        return {
            "index": self.index, "key": self.key, "display_name": self.display_name,
            "prompt_name": self.prompt_name, "official_name": self.official_name, "kind": self.kind,
            "parent": self.parent, "parent_organs": list(self.parent_organs), "laterality": self.laterality,
            "synonyms": list(self.synonyms), "narrower_terms": list(self.narrower_terms),
            "color": list(self.color), "terminology": self.terminology.to_dict(), "sources": dict(self.sources),
            **({"postprocess": self.postprocess.to_dict()} if self.postprocess is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClassInfo":
        """Build a class from its dict form. Only ``index`` and ``display_name`` are required: a new class
        (e.g. "Spinal Cord" from a fine-tuned checkpoint) defaults to kind "organ", prompt/official name =
        display name, Slicer's default "Tissue" terminology and a colour generated from its key."""
        unknown = set(data) - _CLASS_FIELDS
        if unknown:
            raise TaxonomyError(f"class entry {data.get('display_name', data)!r} has unknown fields: "
                                f"{', '.join(sorted(unknown))}")
        if "index" not in data or "display_name" not in data:
            raise TaxonomyError(f"class entry {dict(data)!r} needs at least 'index' and 'display_name'")
        display_name = str(data["display_name"])
        key = str(data.get("key") or _key_from_name(display_name))
        terminology = data.get("terminology")
        color = data.get("color")
        return cls(
            index=data["index"],
            key=key,
            display_name=display_name,
            prompt_name=str(data.get("prompt_name") or display_name),
            official_name=str(data.get("official_name") or display_name),
            synonyms=tuple(data.get("synonyms") or ()),
            kind=str(data.get("kind") or "organ"),
            parent=data.get("parent"),
            laterality=data.get("laterality"),
            color=tuple(color) if color is not None else generate_color(key),
            terminology=Terminology.from_dict(terminology) if terminology else DEFAULT_TERMINOLOGY,
            narrower_terms=tuple(data.get("narrower_terms") or ()),
            parent_organs=tuple(data.get("parent_organs") or ()),
            sources=dict(data.get("sources") or {}),
            postprocess=PostprocessSpec.from_dict(data["postprocess"]) if data.get("postprocess") else None,
        )


_CLASS_FIELDS = {"index", "key", "display_name", "prompt_name", "official_name", "kind", "parent",
                 "parent_organs", "laterality", "synonyms", "narrower_terms", "color", "terminology", "sources",
                 "postprocess"}


# --------------------------------------------------------------------------------------------------------
# Groups


@dataclass(frozen=True)
class GroupSpec:
    """A name for several classes: explicit ``members`` (class keys) and/or every class of some ``kinds``."""

    name: str
    members: Tuple[str, ...] = ()
    kinds: Tuple[str, ...] = ()
    aliases: Tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        bad_kinds = [kind for kind in self.kinds if kind not in KINDS]
        if bad_kinds or not (self.members or self.kinds):
            raise TaxonomyError(f"group {self.name!r} needs members (class keys) or kinds from {KINDS}")

    def to_dict(self) -> dict:
        data: dict = {}
        if self.members:
            data["members"] = list(self.members)
        if self.kinds:
            data["kinds"] = list(self.kinds)
        data["aliases"] = list(self.aliases)
        if self.note:
            data["note"] = self.note
        return data

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "GroupSpec":
        return cls(name, tuple(data.get("members", ())), tuple(data.get("kinds", ())),
                   tuple(data.get("aliases", ())), str(data.get("note", "")))


# --------------------------------------------------------------------------------------------------------
# Text normalisation for the resolver

_SIDES = {"l": "left", "lt": "left", "left": "left", "r": "right", "rt": "right", "right": "right"}


def _words(text: str) -> list:
    """Lower-case words; 'tumour' -> 'tumor'; a side given first or last (L, lt, left...) moved to the front
    as 'left'/'right', so 'kidney (left)', 'L kidney' and 'head of femur left' read as 'left ...'."""
    words = re.findall(r"[a-z0-9]+", text.lower().replace("tumour", "tumor"))
    if len(words) > 1 and words[-1] in _SIDES:
        words = [_SIDES[words[-1]], *words[:-1]]
    elif len(words) > 1 and words[0] in _SIDES:
        words[0] = _SIDES[words[0]]
    return words


def _compact(words: Sequence[str]) -> str:
    # Joining without spaces makes "gall bladder" == "gallbladder" and "post-cava" == "postcava".
    return "".join(words)


# --------------------------------------------------------------------------------------------------------
# The taxonomy


class Taxonomy:
    """An ordered, immutable collection of classes with a resolver from free text to classes.

    Classes are kept in index order (= model channel order), whatever order they are given in.
    """

    def __init__(self, classes: Sequence[ClassInfo], groups: Optional[Iterable[GroupSpec]] = None):
        classes = list(classes)
        for info in classes:
            if not isinstance(info, ClassInfo):
                raise TaxonomyError(f"taxonomy entries must be ClassInfo, got {type(info).__name__}")
        if not classes:
            raise TaxonomyError("a taxonomy needs at least one class")
        self._classes: Tuple[ClassInfo, ...] = tuple(sorted(classes, key=lambda info: info.index))
        self._by_index = {}
        self._by_key = {}
        for info in self._classes:
            if info.index in self._by_index:
                raise TaxonomyError(f"class index {info.index} is used twice ({self._by_index[info.index].key}, "
                                    f"{info.key})")
            if info.key in self._by_key:
                raise TaxonomyError(f"class key {info.key!r} is used twice")
            self._by_index[info.index] = info
            self._by_key[info.key] = info

        self._group_specs: Tuple[GroupSpec, ...] = tuple(_default_group_specs() if groups is None else groups)
        self._groups = {}
        for spec in self._group_specs:
            members = self._group_members(spec)
            if members:
                self._groups[spec.name] = members
        self._lookup, self._readable = self._build_lookup()

    # -- container protocol
    def __len__(self) -> int:
        return len(self._classes)

    def __iter__(self) -> Iterator[ClassInfo]:
        return iter(self._classes)

    def __getitem__(self, index: int) -> ClassInfo:
        """The class with this 1-based official index (not a position)."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"taxonomy[...] takes a 1-based class index (int), got {type(index).__name__}; "
                            "use by_key() or resolve() for names")
        try:
            return self._by_index[index]
        except KeyError:
            raise KeyError(f"no class with index {index}; indices are {self._index_summary()}") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Taxonomy):
            return NotImplemented
        return self._classes == other._classes and self._group_specs == other._group_specs

    def __repr__(self) -> str:
        return f"Taxonomy({len(self)} classes: {', '.join(c.display_name for c in self._classes[:4])}, ...)"

    def by_key(self, key: str) -> ClassInfo:
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"no class with key {key!r}; use resolve() for free text") from None

    @property
    def indices(self) -> Tuple[int, ...]:
        return tuple(info.index for info in self._classes)

    def groups(self) -> dict:
        """Group name -> class indices (in taxonomy order)."""
        return {name: list(members) for name, members in self._groups.items()}

    def extended(self, classes: Iterable[ClassInfo]) -> "Taxonomy":
        """This taxonomy plus more classes (e.g. those a fine-tuned model adds), same group definitions."""
        return Taxonomy([*self._classes, *classes], self._group_specs)

    # -- resolver
    def resolve(self, query: Union[str, Sequence[str]]) -> list:
        """Classes named by ``query``: a string with comma/semicolon separated names, or a list of them.

        Names, synonyms, official and prompt spellings and group names are accepted, ignoring case, spaces,
        hyphens, underscores and 'tumour'/'tumor'. The result is de-duplicated and in taxonomy order.
        Raises UnknownClassError (with the closest suggestions) for anything that names no class.
        """
        items = _split_query(query)
        if not items:
            raise UnknownClassError("No class requested: the text is empty. Name classes such as "
                                    "'liver, spleen' or a group such as 'all organs'.", query=str(query))
        wanted = set()
        for item in items:
            wanted.update(self._resolve_one(item))
        return [info for info in self._classes if info.index in wanted]

    def _resolve_one(self, item: str) -> Tuple[int, ...]:
        words = _words(item)
        if words:
            hit = self._lookup.get(_compact(words))
            if hit is None and len(words[-1]) > 3 and words[-1].endswith("s"):  # plural: "liver tumors"
                hit = self._lookup.get(_compact([*words[:-1], words[-1][:-1]]))
            if hit is not None:
                return hit[1]
        suggestions = self.suggest(item)
        if suggestions:
            message = f'Unknown class "{item}". Did you mean: {", ".join(suggestions)}?'
        else:
            message = (f'Unknown class "{item}". Known classes: '
                       f'{", ".join(info.display_name for info in self._classes)}; '
                       f'groups: {", ".join(self._groups)}.')
        raise UnknownClassError(message, query=item, suggestions=suggestions)

    def suggest(self, text: str, limit: int = _MAX_SUGGESTIONS) -> list:
        """The known class/group names closest to ``text`` (difflib), best first."""
        target = " ".join(_words(text))
        if not target:
            return []
        matches = difflib.get_close_matches(target, list(self._readable), n=4 * limit, cutoff=0.6)
        labels = []
        for match in matches:
            label = self._readable[match]
            if label not in labels:
                labels.append(label)
        return labels[:limit]

    # -- serialisation
    def to_dict(self) -> dict:
        return {
            "format": TAXONOMY_FORMAT, "version": TAXONOMY_VERSION,
            "classes": [info.to_dict() for info in self._classes],
            "groups": {spec.name: spec.to_dict() for spec in self._group_specs},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Taxonomy":
        """Inverse of ``to_dict``; without a "groups" entry the default group definitions are used."""
        if data.get("format", TAXONOMY_FORMAT) != TAXONOMY_FORMAT:
            raise TaxonomyError(f"not a UniversalSeg taxonomy (format {data.get('format')!r})")
        if int(data.get("version", TAXONOMY_VERSION)) > TAXONOMY_VERSION:
            raise TaxonomyError(f"taxonomy version {data['version']} is newer than this library supports "
                                f"({TAXONOMY_VERSION}); please update UniversalSeg")
        if "classes" not in data:
            raise TaxonomyError("a taxonomy needs a 'classes' list")
        classes = [ClassInfo.from_dict(entry) for entry in data["classes"]]
        groups = data.get("groups")
        specs = None if groups is None else [GroupSpec.from_dict(name, spec) for name, spec in groups.items()]
        return cls(classes, specs)

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Taxonomy":
        return cls.from_dict(json.loads(text))

    # -- internals
    def _group_members(self, spec: GroupSpec) -> Tuple[int, ...]:
        # A group is only offered when every listed member exists: a partial "kidneys" would surprise.
        if any(key not in self._by_key for key in spec.members):
            return ()
        chosen = {self._by_key[key].index for key in spec.members}
        chosen.update(info.index for info in self._classes if info.kind in spec.kinds)
        return tuple(info.index for info in self._classes if info.index in chosen)

    def _build_lookup(self):
        lookup = {}     # compact text -> (label, indices)
        readable = {}   # spaced text -> label, for suggestions

        def add(text: str, label: str, indices: Tuple[int, ...]) -> None:
            words = _words(text)
            if not words:
                raise TaxonomyError(f"name {text!r} of {label!r} has no letters or digits")
            compact = _compact(words)
            previous = lookup.get(compact)
            if previous is not None and previous[1] != indices:
                raise TaxonomyError(f"name {text!r} would mean both {previous[0]!r} and {label!r}")
            lookup[compact] = (label, indices)
            readable.setdefault(" ".join(words), label)

        for info in self._classes:
            for name in info.names:
                add(name, info.display_name.lower(), (info.index,))
        for spec in self._group_specs:
            members = self._groups.get(spec.name)
            if members:
                for name in (spec.name, *spec.aliases):
                    add(name, spec.name, members)
        return lookup, readable

    def _index_summary(self) -> str:
        indices = sorted(self._by_index)
        if indices == list(range(indices[0], indices[-1] + 1)):
            return f"{indices[0]}..{indices[-1]}"
        return ", ".join(map(str, indices))


def _split_query(query: Union[str, Sequence[str]]) -> list:
    if isinstance(query, str):
        pieces = [query]
    elif isinstance(query, Sequence):
        pieces = list(query)
        for piece in pieces:
            if not isinstance(piece, str):
                raise InvalidArgumentTypeError(f"class names must be strings, got {piece!r} ({type(piece).__name__})")
    else:
        raise InvalidArgumentTypeError(f"resolve() takes a string or a list of strings, got {type(query).__name__}")
    return [item.strip() for piece in pieces for item in re.split(r"[,;]", piece) if item.strip()]


# --------------------------------------------------------------------------------------------------------
# The packaged table


def _read_packaged_table() -> dict:
    text = resources.files(__package__).joinpath("data").joinpath("taxonomy.json").read_text(encoding="utf-8")
    return json.loads(text)


_PACKAGED = _read_packaged_table()


def _default_group_specs() -> Tuple[GroupSpec, ...]:
    return tuple(GroupSpec.from_dict(name, spec) for name, spec in _PACKAGED["groups"].items())


DEFAULT_TAXONOMY: Taxonomy = Taxonomy.from_dict(_PACKAGED)


def get_taxonomy() -> Taxonomy:
    """The 32 official classes in official order."""
    return DEFAULT_TAXONOMY

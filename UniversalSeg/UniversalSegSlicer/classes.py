"""What the class picker shows: classes grouped by kind, a search that understands synonyms, presets.

The widget only draws what :class:`ClassCatalog` returns; all matching rules live here (and in the
library's taxonomy resolver), so they are tested without Qt.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from UniversalSegLib.taxonomy import ClassInfo, Taxonomy, UnknownClassError, get_taxonomy

__all__ = ["ClassGroup", "ClassCatalog", "PRESETS", "DISPLAY_GROUPS"]

#: Picker sections: title -> class kinds shown in it.
DISPLAY_GROUPS = (("Organs", ("organ",)), ("Vessels", ("vessel",)), ("Tumours and cysts", ("tumor", "cyst")))

#: Presets: label -> text for the taxonomy resolver. A preset is offered only when the model has all its classes.
PRESETS = (
    ("Abdominal organs", "abdominal organs"),
    ("Liver + liver tumour", "liver, liver tumor"),
    ("Pancreas + pancreas tumour", "pancreas, pancreas tumor"),
    ("Kidneys + kidney tumour and cyst", "kidneys, kidney lesions"),
    ("All vessels", "all vessels"),
    ("All tumours and cysts", "all lesions"),
    ("All classes", "all"),
)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower().replace("tumour", "tumor").replace("oesophag", "esophag"))


@dataclass(frozen=True)
class ClassGroup:
    title: str
    classes: tuple[ClassInfo, ...]


class ClassCatalog:
    """The classes a model offers, arranged for the picker.

    Args:
        taxonomy: the model's class table (default: the 32 official classes).
    """

    def __init__(self, taxonomy: Taxonomy | None = None) -> None:
        self.taxonomy = taxonomy or get_taxonomy()
        self._search_words = {info.index: [_words(name) for name in info.names] for info in self.taxonomy}

    def groups(self) -> list[ClassGroup]:
        """Non-empty picker sections in display order, classes in taxonomy order inside each."""
        out = []
        for title, kinds in DISPLAY_GROUPS:
            members = tuple(info for info in self.taxonomy if info.kind in kinds)
            if members:
                out.append(ClassGroup(title, members))
        return out

    def presets(self) -> list[tuple[str, list[int]]]:
        """(label, class indices) of the presets this model supports."""
        out = []
        for label, query in PRESETS:
            try:
                out.append((label, [info.index for info in self.taxonomy.resolve(query)]))
            except UnknownClassError:
                continue  # e.g. a model without kidney classes: no "Kidneys" preset
        return out

    def search(self, text: str) -> list[int]:
        """Indices of the classes the search text matches, in taxonomy order.

        Every typed word must start a word of one of the class's names or synonyms ("kid tum" finds
        Kidney Tumor, "ivc" finds the Inferior Vena Cava, "hcc" finds Liver Tumor); a text the taxonomy
        resolver understands (a group such as "kidneys" or "abdominal organs") adds its classes. An empty
        text matches every class.
        """
        query = _words(text)
        if not query:
            return list(self.taxonomy.indices)
        hits = {index for index, names in self._search_words.items()
                if any(all(any(word.startswith(q) for word in name) for q in query) for name in names)}
        try:
            hits.update(info.index for info in self.taxonomy.resolve(text))
        except UnknownClassError:
            pass
        return [index for index in self.taxonomy.indices if index in hits]

    def resolve(self, selection: Iterable[int | str] | str) -> list[ClassInfo]:
        """Selected classes from indices, keys or free text, in taxonomy order; unknown names raise
        :class:`~UniversalSegLib.taxonomy.UnknownClassError` with suggestions."""
        if isinstance(selection, str):
            return self.taxonomy.resolve(selection)
        indices: set[int] = set()
        texts: list[str] = []
        for item in selection:
            if isinstance(item, int):
                self.taxonomy[item]  # raises KeyError with the valid indices
                indices.add(item)
            else:
                texts.append(str(item))
        if texts:
            indices.update(info.index for info in self.taxonomy.resolve(texts))
        return [info for info in self.taxonomy if info.index in indices]

    @staticmethod
    def describe(classes: Sequence[ClassInfo], limit: int = 4) -> str:
        """Short text for a selection: "Liver, Liver Tumor" or "Spleen, Liver, ... (12 classes)"."""
        names = [info.display_name for info in classes]
        if not names:
            return "no class selected"
        if len(names) <= limit:
            return ", ".join(names)
        return f"{', '.join(names[:limit])}, ... ({len(names)} classes)"

"""Review priorities from the quality signals, and the review queue (``OUT/review_queue.csv``).

Each signal of a (case, class) becomes a score between 0 (no concern) and 1 (certainly worth a look)
together with a sentence saying why. The class's concern is the weighted sum of its scores
(:data:`WEIGHTS`), plus half the mean concern of the case's other classes (a case whose segments are
doubtful all over, from noise or a wrong intensity scale, makes each of its segments more suspect); its
priority is ``1 - exp(-concern)``, between 0 and 1, so one strong signal or several weak ones rank a
segment high. The weights were chosen on the phantom benchmark
(``benchmarks/benchmark_quality_signals.py``, seeds 2000-2035; the README's table is from other seeds). A
case's priority is that of its worst class. The batch-level signals are scored here, over the done cases:

* volume outside the expected range of its class (:data:`EXPECTED_VOLUMES_FILE`, sets with their source);
* volume far from the batch's own (robust z-score: distance from the median in median absolute deviations);
* left/right asymmetry of paired organs (same structure, opposite laterality in the class table);
* an organ found in no voxel although an organ at the same level lies whole inside the scan;
* disagreement with a second model (``--cross-check``): 1 - Dice between the two masks.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import CorruptFileError, InputNotFoundError, UsageError
from ..io.atomic import atomic_output
from ..taxonomy import get_taxonomy
from .quality import paired_organs
from .state import CaseRecord

__all__ = ["QueueEntry", "build_queue", "write_queue_csv", "read_queue_csv", "load_expected_volumes",
           "EXPECTED_VOLUMES_FILE", "QUEUE_COLUMNS", "QUEUE_FILE", "NO_CONCERN"]

EXPECTED_VOLUMES_FILE = Path(__file__).resolve().parents[1] / "data" / "expected_volumes.json"
QUEUE_FILE = "review_queue.csv"
#: The reasons cell of a class without any concern.
NO_CONCERN = "no concern"
#: Separator of a class's reasons in the reasons cell ("<class>: <reason>; <reason>").
REASON_SEPARATOR = "; "
QUEUE_COLUMNS = ("rank", "case", "class", "priority", "case_priority", "volume_ml", "reasons", "folder")
#: Robust z-scores need this many cases with the class before they mean anything.
MIN_CASES_FOR_Z = 5
#: Weight of each signal's score in a class's concern.
WEIGHTS = {"uncertainty": 1.0, "fragmentation": 1.0, "overlap": 2.0, "cut": 0.5, "range": 0.5, "batch": 0.5,
           "asymmetry": 1.0, "missing": 2.0, "cross-check": 2.0}
#: Share of the case's mean concern added to each of its classes.
CASE_CONTEXT = 0.5


@dataclass
class QueueEntry:
    case: str
    key: str
    name: str
    priority: float
    volume_ml: float
    reasons: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    case_priority: float = 0.0
    folder: str = ""


@dataclass(frozen=True)
class ExpectedVolumes:
    ranges: dict
    source: str
    level_with: dict
    may_be_absent: frozenset


def load_expected_volumes(which: str | None = None) -> ExpectedVolumes:
    """A set of the packaged file by name (``"ct"``, the default, or ``"phantom"``), or a JSON file of the
    same layout (its first set is used)."""
    which = which or "ct"
    path = EXPECTED_VOLUMES_FILE if which in ("ct", "phantom") or not Path(which).is_file() else Path(which)
    if path == EXPECTED_VOLUMES_FILE and which not in ("ct", "phantom"):
        raise UsageError(f"--expected-volumes {which!r}: give ct, phantom, or a JSON file like {EXPECTED_VOLUMES_FILE}.")
    document = json.loads(path.read_text())
    sets = document["sets"]
    chosen = sets[which] if which in sets else next(iter(sets.values()))
    return ExpectedVolumes({k: tuple(v) for k, v in chosen["ranges_ml"].items()}, chosen.get("source", str(path)),
                           dict(document.get("level_with", {})), frozenset(document.get("may_be_absent", ())))


def _clip(value: float) -> float:
    return float(min(1.0, max(0.0, value)))


def _class_scores(s: dict, name: str) -> list[tuple[str, float, str]]:
    """(signal, score, reason) from one class's own measurements."""
    out = []
    if not s.get("volume_ml"):
        return out  # nothing segmented: judged by the missing-organ rule only
    uncertain = s.get("uncertain_share")
    if uncertain is not None and uncertain > 0.15:
        out.append(("uncertainty", _clip((uncertain - 0.15) / 0.45),
                    f"{uncertain:.0%} of the segment has a probability between 20 and 80 % (the model hesitates)"))
    pieces, largest = s.get("pieces") or 0, s.get("largest_share")
    if pieces > 1 and largest is not None:
        out.append(("fragmentation", _clip((1 - largest) / 0.3),
                    f"{pieces} pieces before clean-up, the largest holding {largest:.0%}"))
    for other, share in sorted((s.get("overlaps") or {}).items()):
        if share > 0.01:
            out.append(("overlap", _clip(share / 0.2),
                        f"{share:.0%} of it is also labelled {other.replace('_', ' ')}, which it cannot overlap"))
    if s.get("cut_by_fov"):
        out.append(("cut", 0.25, "it touches the first or last slice: cut by the field of view, volume partial"))
    dice = s.get("cross_check_dice")
    if dice is not None and dice < 0.9:
        out.append(("cross-check", _clip((0.9 - dice) / 0.5), f"the second model agrees with Dice {dice:.2f} only"))
    return out


def build_queue(records: Sequence[CaseRecord], expected_volumes: str | None = None) -> list[QueueEntry]:
    """Scored entries of every (done case, class), highest priority first."""
    expected = load_expected_volumes(expected_volumes)
    taxonomy = get_taxonomy()
    done = [r for r in records if r.status == "done" and r.signals]
    volumes: dict[str, list[float]] = {}
    for record in done:
        for key, s in record.signals.items():
            if s.get("volume_ml"):
                volumes.setdefault(key, []).append(float(s["volume_ml"]))
    robust = {}
    for key, values in volumes.items():
        if len(values) >= MIN_CASES_FOR_Z:
            median = float(np.median(values))
            mad = 1.4826 * float(np.median(np.abs(np.asarray(values) - median)))
            robust[key] = (median, max(mad, 0.05 * median, 1e-6))
    entries: list[QueueEntry] = []
    for record in done:
        signals = record.signals
        names = {key: _display_name(taxonomy, key) for key in signals}
        scored: dict[str, list[tuple[str, float, str]]] = {key: _class_scores(s, names[key]) for key, s in signals.items()}
        for key, s in signals.items():
            volume = float(s.get("volume_ml") or 0.0)
            if not volume:
                continue
            low_high = expected.ranges.get(key)
            if low_high is not None and not low_high[0] <= volume <= low_high[1]:
                bound = low_high[0] if volume < low_high[0] else low_high[1]
                factor = abs(math.log(volume / bound)) / math.log(2)  # 1 = twice too large or half too small
                cut = s.get("cut_by_fov") and volume < low_high[0]
                scored[key].append(("range", _clip(factor) * (0.5 if cut else 1.0),
                                    f"{volume:.0f} ml is {'below' if volume < bound else 'above'} the expected "
                                    f"{low_high[0]:g}-{low_high[1]:g} ml"))
            if key in robust:
                median, spread = robust[key]
                z = (volume - median) / spread
                if abs(z) > 2.5:
                    scored[key].append(("batch", _clip((abs(z) - 2.5) / 4),
                                        f"{volume:.0f} ml is {abs(z):.1f} robust SDs {'above' if z > 0 else 'below'} "
                                        f"this batch's median {median:.0f} ml"))
        classes = [taxonomy.by_key(k) for k in signals if _known(taxonomy, k)]
        for left, right in paired_organs(classes):
            a, b = (float(signals[c.key].get("volume_ml") or 0.0) for c in (left, right))
            if max(a, b) <= 0 or signals[left.key].get("cut_by_fov") or signals[right.key].get("cut_by_fov"):
                continue
            asymmetry = abs(a - b) / max(a, b)
            if asymmetry > 0.3:
                smaller = left if a < b else right
                text = (f"{left.display_name} {a:.0f} ml vs {right.display_name} {b:.0f} ml: "
                        f"{asymmetry:.0%} asymmetry of a paired organ")
                scored[smaller.key].append(("asymmetry", _clip((asymmetry - 0.3) / 0.5), text))
        whole = {k for k, s in signals.items() if s.get("volume_ml") and not s.get("cut_by_fov")}
        for key, s in signals.items():
            if s.get("volume_ml") or key not in expected.level_with:
                continue
            anchors = [k for k in expected.level_with[key] if k in whole]
            if anchors:
                absent_ok = key in expected.may_be_absent
                scored[key].append(("missing", 0.5 if absent_ok else 1.0,
                                    f"not found although {', '.join(_display_name(taxonomy, a) for a in anchors)} "
                                    f"at the same level lies whole inside the scan"
                                    + (" (it may have been removed)" if absent_ok else "")))
        concern = {key: sum(WEIGHTS[signal] * score for signal, score, _ in items) for key, items in scored.items()}
        context = CASE_CONTEXT * float(np.mean(list(concern.values()))) if concern else 0.0
        case_entries = []
        for key, items in scored.items():
            reasons = [text for _, score, text in sorted(items, key=lambda t: -WEIGHTS[t[0]] * t[1]) if score > 0]
            if reasons and context >= 0.25:
                reasons.append(f"other segments of this case are doubtful too (case concern {context:.2f})")
            case_entries.append(QueueEntry(
                record.case_id, key, names[key], round(1.0 - math.exp(-(concern[key] + context)), 4),
                float(signals[key].get("volume_ml") or 0.0), reasons,
                {signal: round(score, 4) for signal, score, _ in items},
                folder=str(Path(record.outputs.get("summary", "")).parent) if record.outputs else ""))
        case_priority = max((e.priority for e in case_entries), default=0.0)
        for entry in case_entries:
            entry.case_priority = case_priority
        entries += case_entries
    entries.sort(key=lambda e: (-e.priority, -e.case_priority, e.case, e.key))
    return entries


def _known(taxonomy, key: str) -> bool:
    try:
        taxonomy.by_key(key)
    except Exception:  # noqa: BLE001 - a class of a custom model unknown to the packaged table
        return False
    return True


def _display_name(taxonomy, key: str) -> str:
    return taxonomy.by_key(key).display_name if _known(taxonomy, key) else key.replace("_", " ")


def write_queue_csv(path: Path, entries: Iterable[QueueEntry]) -> Path:
    """The queue as CSV, highest priority first, each row with its reasons in plain words."""
    with atomic_output(path, overwrite=True) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(QUEUE_COLUMNS)
            for rank, e in enumerate(entries, start=1):
                writer.writerow([rank, e.case, e.name, f"{e.priority:.3f}", f"{e.case_priority:.3f}",
                                 f"{e.volume_ml:.1f}", f"{e.name}: {REASON_SEPARATOR.join(e.reasons)}" if e.reasons else NO_CONCERN,
                                 e.folder])
    return path


def read_queue_csv(path: str | Path) -> list[QueueEntry]:
    """The entries of a queue written by :func:`write_queue_csv`, in its order (highest priority first).

    The file names classes by display name only: ``key`` is that name as written (callers that know the
    case's class keys map it back); ``scores`` are not in the file and stay empty."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found: 'universalseg batch' writes it when the batch finishes.")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in QUEUE_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise CorruptFileError(f"{path} is not a review queue of 'universalseg batch' (no column "
                                    f"{', '.join(missing)}).")
        entries = []
        for row in reader:
            cell, prefix = row["reasons"], f"{row['class']}: "
            reasons = cell[len(prefix):].split(REASON_SEPARATOR) if cell.startswith(prefix) else []
            try:
                entries.append(QueueEntry(row["case"], row["class"], row["class"], float(row["priority"]),
                                          float(row["volume_ml"]), reasons, case_priority=float(row["case_priority"]),
                                          folder=row["folder"]))
            except ValueError:
                raise CorruptFileError(f"{path}, rank {row.get('rank')}: not a number where one is expected.") from None
    return entries

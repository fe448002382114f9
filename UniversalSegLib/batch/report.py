"""``OUT/report.html``: one self-contained page (no network, images inline) summarising a batch and
showing the review queue's top entries with a thumbnail overlay of the flagged class and its reasons.

Thumbnails are drawn with matplotlib when it is installed (``pip install 'universalseg[demo]'``); without
it the page lists the entries without pictures and says so.
"""
from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..io.atomic import atomic_output
from ..taxonomy import get_taxonomy
from .queue import QueueEntry
from .state import CaseRecord
from .worker import case_files

__all__ = ["write_report", "TOP_ENTRIES"]

#: How many of the queue's entries the page shows with a picture.
TOP_ENTRIES = 20


def _thumbnail_png(folder: str, case: str, key: str, color) -> str | None:
    """A base64 PNG of the class's axial slice with its segment outlined, or None."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    path = case_files(folder, case)["thumbnails"]
    if not path.is_file():
        return None
    with np.load(path) as data:
        if f"{key}_ct" not in data:
            return None
        image, mask = data[f"{key}_ct"], data[f"{key}_mask"]
    figure = Figure(figsize=(2.2, 2.2), dpi=80)
    axis = figure.add_axes([0, 0, 1, 1])
    def radiological(plane: np.ndarray) -> np.ndarray:
        """RAS (x, y) plane -> anterior up, the patient's right on the left of the picture."""
        return np.rot90(plane)[:, ::-1]

    axis.imshow(radiological(image), cmap="gray", vmin=0, vmax=255)
    overlay = np.zeros((*mask.shape, 4))
    overlay[mask > 0] = (*[c / 255 for c in color], 0.45)
    axis.imshow(radiological(overlay))
    axis.set_axis_off()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_report(path: Path, records: Sequence[CaseRecord], entries: Sequence[QueueEntry]) -> Path:
    """Write the page; returns its path."""
    taxonomy = get_taxonomy()
    done = [r for r in records if r.status == "done"]
    failed = [r for r in records if r.status == "failed"]
    seconds = [r.seconds for r in done if r.seconds]
    try:
        import matplotlib  # noqa: F401
        pictures = True
    except ImportError:
        pictures = False
    rows = []
    for rank, entry in enumerate(entries[:TOP_ENTRIES], start=1):
        picture = ""
        if pictures and entry.folder:
            try:
                color = taxonomy.by_key(entry.key).color
            except KeyError:
                color = (255, 0, 0)
            png = _thumbnail_png(entry.folder, entry.case, entry.key, color)
            picture = f'<img alt="{html.escape(entry.name)}" src="data:image/png;base64,{png}">' if png else ""
        reasons = "".join(f"<li>{html.escape(r)}</li>" for r in entry.reasons) or "<li>no concern</li>"
        rows.append(f"<tr><td>{rank}</td><td>{picture}</td><td><b>{html.escape(entry.case)}</b><br>"
                    f"{html.escape(entry.name)}<br>priority {entry.priority:.2f} (case {entry.case_priority:.2f})"
                    f"<br>{entry.volume_ml:.1f} ml</td><td><ul>{reasons}</ul></td></tr>")
    failures = "".join(f"<tr><td>{html.escape(r.case_id)}</td><td>{html.escape(r.error or '')}</td></tr>" for r in failed)
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>UniversalSeg batch report</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;vertical-align:top}}img{{width:176px;height:176px}}</style></head><body>
<h1>UniversalSeg batch report</h1>
<p>Written {time.strftime('%Y-%m-%d %H:%M:%S')}. Cases: {len(records)}; done {len(done)}; failed {len(failed)};
mean {np.mean(seconds) if seconds else 0:.1f} s per case. Segments in the review queue: {len(entries)}.</p>
{'' if pictures else '<p>Thumbnails need matplotlib (pip install "universalseg[demo]").</p>'}
<h2>Review first (top {min(TOP_ENTRIES, len(entries))})</h2>
<table><tr><th>#</th><th>slice</th><th>case, class</th><th>why</th></tr>{''.join(rows)}</table>
<h2>Failed cases</h2>
{f'<table><tr><th>case</th><th>error</th></tr>{failures}</table>' if failed else '<p>None.</p>'}
</body></html>
"""
    with atomic_output(path, overwrite=True) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return path

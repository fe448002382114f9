"""The offline demo: a fresh phantom CT, segmented by the small demo model, scored against its truth.

:func:`run_demo` needs no download and no GPU: it draws a procedural abdominal CT
(:mod:`UniversalSegLib.phantom`), segments it with the demo checkpoint shipped in the package
(``data/demo/demo_model.safetensors``, a tiny U-Net trained on phantoms with ``universalseg-training``),
writes the results through the same output plan and writers as ``universalseg segment``, and reports
per-class Dice against the phantom's exact truth.

Outputs in ``output_dir``: ``phantom_ct.nii.gz`` (the CT), ``phantom.seg.nrrd`` (3D Slicer segmentation
with names, colours, terminology), ``phantom_labels.nii.gz`` (+ ``.labels.json``/``.labels.csv``),
``phantom_summary.json`` (per-class volumes), ``truth_labels.nii.gz``, ``overlay.png`` (axial, coronal and
sagittal views) and ``dice.json``.

The demo model knows phantoms only: it is no substitute for the released weights on real CT
(``universalseg segment`` with the official checkpoint).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["DemoResult", "demo_checkpoint_path", "run_demo", "write_overlay_png", "format_dice_table"]

DEMO_CHECKPOINT = "demo_model.safetensors"


@dataclass
class DemoResult:
    """What the demo produced."""

    output_dir: Path
    files: dict[str, Path]
    dice: dict[str, float]
    volumes_ml: dict[str, tuple[float, float]]  # class -> (truth ml, predicted ml)
    seconds: dict[str, float]
    seed: int
    phantom_parameters: dict = field(default_factory=dict)

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.dice.values()))) if self.dice else float("nan")


def demo_checkpoint_path() -> Path:
    """The demo model shipped inside the package."""
    path = Path(str(resources.files(__package__).joinpath("data", "demo", DEMO_CHECKPOINT)))
    if not path.is_file():
        raise FileNotFoundError(f"the demo model {path} is missing from this installation of UniversalSeg; "
                                "reinstall the package (the file ships inside it).")
    return path


def format_dice_table(result: DemoResult) -> str:
    """Plain-text table: class, truth and predicted volume, Dice."""
    width = max([len(name) for name in result.dice] + [5])
    lines = [f"{'class':<{width}}  truth ml  predicted ml   Dice", "-" * (width + 33)]
    for name, value in result.dice.items():
        truth_ml, predicted_ml = result.volumes_ml[name]
        lines.append(f"{name:<{width}}  {truth_ml:8.1f}  {predicted_ml:12.1f}  {value:5.3f}")
    lines.append(f"{'mean':<{width}}  {'':8}  {'':12}  {result.mean_dice:5.3f}")
    return "\n".join(lines)


def _canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The array re-ordered so that its axes point to R, A, S (no resampling)."""
    import nibabel as nib

    orientation = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(array, orientation)


def write_overlay_png(path: str | Path, image: np.ndarray, affine: np.ndarray, labels: np.ndarray, colors: dict,
                      title: str = "", window: tuple[float, float] = (-175.0, 250.0),
                      truth: np.ndarray | None = None) -> Path:
    """Axial, coronal and sagittal slices through the labelled region with coloured labels (radiological view:
    the patient's right on the left); with ``truth``, a second row shows it on the same slices. Uses
    matplotlib's object API (no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ct = _canonical(np.asarray(image, dtype=np.float32), affine)
    lab = _canonical(np.asarray(labels), affine)
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    mm = np.empty(3)
    mm[np.abs(np.asarray(affine)[:3, :3]).argmax(axis=0)] = zooms  # voxel size along R, A, S
    centre = np.argwhere(lab > 0).mean(axis=0).round().astype(int) if (lab > 0).any() else np.array(ct.shape) // 2
    lut = np.zeros((int(max(colors, default=0)) + 1, 4))
    for index, rgb in colors.items():
        lut[int(index)] = [*(c / 255.0 for c in rgb), 0.55]
    low, high = window

    rows = [("segmentation", lab)]
    if truth is not None:
        rows.append(("truth", _canonical(np.asarray(truth), affine)))
    figure = Figure(figsize=(13, 4.6 * len(rows)), dpi=100)
    FigureCanvasAgg(figure)
    for r, (row_name, row_labels) in enumerate(rows):
        # (name, 2-D CT, 2-D labels, pixel aspect, screen-left/right letters). Transposed so that rows run along
        # the second axis, flipped so that anterior/superior is up and the patient's right (or anterior) is left.
        views = [
            ("axial", ct[:, :, centre[2]], row_labels[:, :, centre[2]], mm[1] / mm[0], ("R", "L")),
            ("coronal", ct[:, centre[1], :], row_labels[:, centre[1], :], mm[2] / mm[0], ("R", "L")),
            ("sagittal", ct[centre[0], :, :], row_labels[centre[0], :, :], mm[2] / mm[1], ("A", "P")),
        ]
        for n, (name, slab, slab_labels, aspect, sides) in enumerate(views):
            axis = figure.add_subplot(len(rows), 3, 3 * r + n + 1)
            shown = slab.T[::-1, ::-1]
            shown_labels = slab_labels.T[::-1, ::-1]
            axis.imshow(np.clip((shown - low) / (high - low), 0, 1), cmap="gray", aspect=aspect, interpolation="nearest")
            axis.imshow(lut[np.clip(shown_labels, 0, len(lut) - 1).astype(int)], aspect=aspect, interpolation="nearest")
            axis.set_title(f"{row_name}: {name}")
            axis.set_xticks([])
            axis.set_yticks([])
            axis.text(0.02, 0.5, sides[0], color="yellow", transform=axis.transAxes, fontsize=12, va="center")
            axis.text(0.94, 0.5, sides[1], color="yellow", transform=axis.transAxes, fontsize=12, va="center")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(str(path))
    return path


def run_demo(output_dir: str | Path, seed: int | None = None, checkpoint: str | Path | None = None,
             device: str = "cpu", threads: int | None = None, overwrite: bool = False,
             log: Callable[[str], None] | None = print) -> DemoResult:
    """Generate a phantom CT, segment it with the demo model, write the outputs and score them.

    Args:
        output_dir: folder for the outputs (created; existing outputs are kept unless ``overwrite``).
        seed: phantom seed (default: a fresh random one, printed so the run can be repeated).
        checkpoint: another model to use instead of the packaged demo model.
        device: ``"cpu"`` (default), ``"cuda"``, or ``"auto"``.
        threads: CPU threads for PyTorch.
        overwrite: replace existing output files.
        log: where progress lines go (``None``: silent).
    """
    from .api import OutputPlan, write_result
    from .checkpoints import load_checkpoint
    from .helpers import dice_score, voxel_volume_ml
    from .io.atomic import atomic_output, prepare_output_path
    from .io.formats import OUTPUT_FORMATS
    from .io.writers import nifti_image
    from .phantom import generate_phantom
    from .pipeline import Segmenter

    say = log or (lambda message: None)
    output_dir = Path(output_dir).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    plan = OutputPlan(output_dir, "phantom", ("nifti", "seg.nrrd"))
    planned = plan.paths()
    files = {
        "ct": output_dir / "phantom_ct.nii.gz", "seg_nrrd": planned["seg.nrrd"], "labels": planned["nifti"],
        "summary": planned["summary"], "truth": output_dir / "truth_labels.nii.gz",
        "overlay": output_dir / "overlay.png", "dice": output_dir / "dice.json",
    }
    plan.check(overwrite)  # fail before any work if an output exists
    for key in ("ct", "truth", "overlay", "dice"):
        prepare_output_path(files[key], overwrite)
    seconds: dict[str, float] = {}
    if seed is None:
        seed = int(np.random.default_rng().integers(0, 2**31 - 1))

    start = time.perf_counter()
    model = load_checkpoint(checkpoint or demo_checkpoint_path())
    phantom_settings = dict(model.metadata.provenance.get("phantom", {}))
    shape = tuple(phantom_settings.get("shape", (96, 96, 96)))
    spacing = tuple(phantom_settings.get("spacing", (3.2, 3.2, 3.2)))
    phantom = generate_phantom(seed, shape=shape, spacing=spacing, orientation=phantom_settings.get("orientation", "LPS"))
    seconds["phantom"] = time.perf_counter() - start
    say(f"Phantom CT: seed {seed}, {'x'.join(map(str, shape))} voxels of {spacing[0]:g} mm, "
        f"lesions {phantom.parameters['lesions'] or 'none'}")

    start = time.perf_counter()
    segmenter = Segmenter(model, device=device, threads=threads)
    result = segmenter.segment(phantom.volume)
    seconds["segment"] = time.perf_counter() - start
    say(f"Segmented {len(result.classes)} classes in {seconds['segment']:.1f} s ({result.windows} windows, {device})")

    start = time.perf_counter()
    import nibabel as nib

    taxonomy = segmenter.taxonomy
    volume = phantom.volume
    with atomic_output(files["ct"], overwrite) as temporary:
        nib.save(nifti_image(phantom.image, phantom.affine, is_label=False), str(temporary))
    write_result(result, plan, overwrite=overwrite)
    truth = {c.index: phantom.masks[c.index] for c in result.classes if c.index in phantom.masks}
    OUTPUT_FORMATS["nifti"].write(files["truth"], volume, truth, taxonomy, overwrite=overwrite)
    labels = np.asarray(nib.load(str(files["labels"])).dataobj)
    truth_labels = np.asarray(nib.load(str(files["truth"])).dataobj)
    try:
        import matplotlib  # noqa: F401  (only the PNG needs it)
    except ImportError:
        say("overlay.png skipped: matplotlib is not installed (pip install 'universalseg[demo]')")
        del files["overlay"]
    else:
        with atomic_output(files["overlay"], overwrite) as temporary:
            write_overlay_png(temporary, phantom.image, phantom.affine, labels, {c.index: c.color for c in taxonomy},
                              title=f"UniversalSeg demo: phantom seed {seed}", truth=truth_labels)

    voxel_ml = voxel_volume_ml(phantom.affine)
    dice, volumes = {}, {}
    for info in result.classes:
        if info.index not in phantom.masks:
            continue
        predicted, expected = result.masks[info.index], phantom.masks[info.index]
        if not expected.any() and not predicted.any():
            continue  # e.g. a lesion this phantom does not have, and none predicted: nothing to score
        dice[info.display_name] = dice_score(predicted, expected)
        volumes[info.display_name] = (expected.sum() * voxel_ml, predicted.sum() * voxel_ml)
    seconds["write"] = time.perf_counter() - start
    demo = DemoResult(output_dir, files, dice, volumes, seconds, int(seed), phantom.parameters)
    with atomic_output(files["dice"], overwrite) as temporary:
        temporary.write_text(json.dumps({
            "seed": int(seed), "dice": dice, "mean_dice": demo.mean_dice,
            "volumes_ml": {k: {"truth": v[0], "predicted": v[1]} for k, v in volumes.items()},
            "seconds": seconds, "checkpoint": str(checkpoint or demo_checkpoint_path()),
            "phantom": phantom.parameters}, indent=1))
    say(format_dice_table(demo))
    say(f"Outputs in {output_dir}: " + ", ".join(p.name for p in files.values()))
    return demo

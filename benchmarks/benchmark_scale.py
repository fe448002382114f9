#!/usr/bin/env python3
"""Scale check: a 512 x 512 x 800 CT end to end on CPU, with per-stage time and peak RSS.

The CT is the shared example CT resampled (trilinear) onto a 512 x 512 x 800 grid over the same extent
(about 0.7 x 0.6 x 0.4 mm voxels), stored as int16 NIfTI like a scanner export. It is made in this process;
the segmentation runs in a child process (``benchmark_modes.run_mode``: read, model load, preprocess,
inference, post-process, invert, write .seg.nrrd + NIfTI label map), so the figures are the run's own;
the masks are not kept after writing (32 masks of 210 MB would be the harness's memory, not the run's).

    python benchmarks/benchmark_scale.py                      # Swin UNETR fixture weights, all classes, fast mode
    python benchmarks/benchmark_scale.py --mode default --shape 512 512 800
    python benchmarks/benchmark_scale.py --organ-like-masks   # the writers alone, on trained-model-like masks

The fixture weights' masks are random and overlap in every class, which no trained model produces (a
``.seg.nrrd`` would need one layer per class). ``--organ-like-masks`` skips the network and writes 26
disjoint organ-like regions plus 6 lesions inside them (two layers, like a trained model's output) through
the pipeline's own masks-on-the-input-grid path, to measure the writers at this size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNIVERSALSEG_SHARED", REPO.parent / "shared"))


def make_large_ct(source: Path, shape: tuple[int, int, int], path: Path) -> Path:
    """Resample ``source`` onto ``shape`` voxels covering the same physical box; write int16 NIfTI."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    old_size, old_spacing = image.GetSize(), image.GetSpacing()
    spacing = [sz * sp / n for sz, sp, n in zip(old_size, old_spacing, shape)]
    # Keep the physical box: the first voxel centre moves by half the change of voxel size.
    direction = [image.GetDirection()[i * 3:(i + 1) * 3] for i in range(3)]
    origin = list(image.GetOrigin())
    for axis in range(3):
        shift = (spacing[axis] - old_spacing[axis]) / 2.0
        for row in range(3):
            origin[row] += direction[row][axis] * shift
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in shape])
    resampler.SetOutputSpacing(spacing)
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(-1024)
    resampler.SetOutputPixelType(sitk.sitkInt16)
    sitk.WriteImage(resampler.Execute(image), str(path), useCompression=False)
    return path


def organ_like_masks(body, seed: int = 0) -> list:
    """32 masks on the preprocessed grid: the body split into 26 regions around random centres (Voronoi
    cells), then 6 'lesions' (the inner half of a region each), overlapping their region."""
    import numpy as np

    rng = np.random.default_rng(seed)
    points = np.argwhere(body)
    centres = points[rng.choice(len(points), size=26, replace=False)].astype(np.float32)
    grid = np.indices(body.shape, dtype=np.float32)
    nearest = np.zeros(body.shape, dtype=np.int8)
    best = np.full(body.shape, np.inf, dtype=np.float32)
    for n, centre in enumerate(centres):
        distance = sum((grid[a] - centre[a]) ** 2 for a in range(3))
        closer = distance < best
        nearest[closer], best[closer] = n, distance[closer]
    organs = [body & (nearest == n) for n in range(26)]
    lesions = [organ & (best < np.median(best[organ])) for organ in organs[:6]]
    return organs + lesions


def write_stage(path: Path, formats: str) -> dict:
    """Read, preprocess and write ``path`` with organ-like masks (no network); per-stage time and peak RSS."""
    import tempfile as _tempfile

    import numpy as np
    from benchmark_modes import StageClock

    from UniversalSegLib.api import plan_outputs, write_result
    from UniversalSegLib.io import read_volume
    from UniversalSegLib.pipeline import SegmentationResult, masks_on_input_grid
    from UniversalSegLib.preprocess import preprocess
    from UniversalSegLib.taxonomy import get_taxonomy

    clock = StageClock(cuda=False)
    clock.begin("read")
    volume = read_volume(str(path))
    clock.begin("preprocess_and_masks")
    prep = preprocess(volume.array, volume.affine, resample_dtype=np.float32)
    classes = list(get_taxonomy())
    on_prep = dict(zip([c.index for c in classes], organ_like_masks(prep.array > 0.2)))
    result = SegmentationResult(volume=volume, classes=classes, masks=masks_on_input_grid(volume, prep, on_prep),
                                preprocessed=prep)
    clock.begin("write")
    with _tempfile.TemporaryDirectory() as out:
        written = write_result(result, plan_outputs(str(path), out, formats))
        sizes = {name: Path(p).stat().st_size for name, p in written.items() if Path(p).is_file()}
    clock.end()
    return {"masks": "organ-like (26 disjoint + 6 lesions)", "formats": formats, "input_shape": list(volume.shape),
            "preprocessed_shape": list(prep.shape), "classes": len(classes), "output_bytes": sizes,
            "stages": clock.stages, "peak_rss_mb": max(r["peak_rss_mb"] for r in clock.stages.values()),
            "total_seconds": round(sum(r["seconds"] for r in clock.stages.values()), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(SHARED / "data/totalsegmentator/example_ct.nii.gz"))
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 800))
    parser.add_argument("--mode", default="fast", choices=["default", "fast", "reference"])
    parser.add_argument("--classes", default="all")
    parser.add_argument("--backbone", default="swinunetr", choices=["swinunetr", "unet"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--formats", default="nifti,seg.nrrd",
                        help="outputs to write. The fixture weights' random masks overlap in every class, so their "
                             ".seg.nrrd needs one 210 MB layer per class at this size; trained models need 2-3")
    parser.add_argument("--organ-like-masks", action="store_true",
                        help="skip the network: write organ-like masks (see above) to measure the writers")
    parser.add_argument("--output", help="append the JSON record to this file")
    args = parser.parse_args()

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    from benchmark_cpu import _fixture_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        big = make_large_ct(Path(args.source), tuple(args.shape), Path(tmp) / "large_ct.nii")
        if args.organ_like_masks:
            code = ("import sys, json; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
                    "from benchmark_scale import write_stage\n"
                    "print(json.dumps(write_stage(%r, %r)))\n") % (str(REPO), str(here), str(big), args.formats)
        else:
            model = _fixture_checkpoint(args.backbone, Path(tmp))
            code = (
                "import sys, json, argparse; sys.path.insert(0, %r); sys.path.insert(0, %r)\n"
                "from benchmark_modes import run_mode\n"
                "args = argparse.Namespace(input=%r, device='cpu', threads=%d, precision='float32', classes=%r, "
                "formats=%r)\n"
                "record, _ = run_mode(%r, args, %r, keep_masks=False)\n"
                "print(json.dumps(record))\n"
            ) % (str(REPO), str(here), str(big), args.threads, args.classes, args.formats, args.mode, str(model))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the large-CT run failed:\n{done.stderr[-4000:]}")
        record = json.loads(done.stdout.strip().splitlines()[-1])
    record["input_bytes_int16"] = int(2 * args.shape[0] * args.shape[1] * args.shape[2])
    print(json.dumps(record))
    shape = "x".join(map(str, record["input_shape"]))
    if args.organ_like_masks:
        print(f"\nwriters alone ({record['masks']}), {shape} voxels, {args.formats}: ", end="")
    else:
        print(f"\n{args.mode} mode, {record['classes']} classes, {shape} voxels -> "
              f"{'x'.join(map(str, record['preprocessed_shape']))} preprocessed, {record['windows']} windows: ", end="")
    print(f"{record['total_seconds']} s, peak RSS {record['peak_rss_mb']:.0f} MB")
    for name, stage in record["stages"].items():
        print(f"  {name:<20} {stage['seconds']:>8} s  {stage['peak_rss_mb']:>8.0f} MB")
    if args.output:
        with open(args.output, "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

"""Make the README pictures of the Slicer module, offscreen (no Slicer GUI needed).

    python Resources/Screenshots/make_screenshots.py [--shared ../shared] [--out Resources/Screenshots]

What they show: the segments exactly as the module creates them (``insert_class_masks``: one segment per
class with UniversalSeg's names, colours and standard terminology, shared labelmap layers, closed
surfaces) on the real example CT of the shared data (TotalSegmentator's ``example_ct``). The masks are that
CT's reference organ masks (``example_seg_hist``, TotalSegmentator v1), NOT a UniversalSeg prediction: the
official UniversalSeg weights cannot be downloaded on the machine that made these pictures.
Needs the slicer-core wheel, matplotlib, nibabel, and offscreen OpenGL (EGL or OSMesa) for the 3D view.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "UniversalSeg")]
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

#: Reference masks of example_ct (file stem in example_seg_hist) -> UniversalSeg class index.
REFERENCE_MASKS = {"liver": 6, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "pancreas": 11, "stomach": 7,
                   "gallbladder": 4, "aorta": 8, "inferior_vena_cava": 9}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)

    import nibabel as nib
    import numpy as np

    from UniversalSegLib.mrml import headless_scene, mask_from_segment, volume_from_node
    from UniversalSegLib.taxonomy import get_taxonomy
    from UniversalSegSlicer.results import insert_class_masks
    from UniversalSegSlicer.snapshots import render_overlay, render_surfaces

    data = args.shared / "data" / "totalsegmentator"
    headless = headless_scene()
    node = headless.load_volume(data / "example_ct.nii.gz", "example_ct")
    volume = volume_from_node(node)
    taxonomy = get_taxonomy()
    masks = {}
    for stem, index in REFERENCE_MASKS.items():
        image = nib.load(str(data / "example_seg_hist" / f"{stem}.nii.gz"))
        assert np.allclose(image.affine, volume.affine, atol=1e-3), "mask and CT grids differ"
        masks[index] = np.asarray(image.dataobj) > 0.5
    classes = [taxonomy[i] for i in sorted(masks)]
    applied = insert_class_masks(headless.scene, node, masks, classes, show_3d=True)
    # what is drawn is read back from the segmentation node, not the input masks
    shown = {index: mask_from_segment(applied.segmentation_node, segment_id, node)
             for index, segment_id in applied.segment_ids.items()}
    liver_k = np.flatnonzero(shown[6].any(axis=(0, 1)))
    kidney_k = np.flatnonzero(shown[2].any(axis=(0, 1)))
    slices = [int(np.percentile(liver_k, 75)), int(np.percentile(liver_k, 35)), int(np.median(kidney_k))]
    args.out.mkdir(parents=True, exist_ok=True)
    overlay = render_overlay(args.out / "UniversalSeg_overlay.png", volume.array, volume.affine, shown, classes,
                             slices, title="Segments in axial slices (radiological view: patient's right on the left)")
    surfaces = render_surfaces(args.out / "UniversalSeg_3d.png", applied.segmentation_node)
    print(overlay)
    print(surfaces)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""int8 (NNCF post-training quantisation) of the OpenVINO network against the float32 network.

The bar for offering int8 as an explicit opt-in: at least 99 % Dice per class against the float32
OpenVINO labels, with trained weights. This script measures it and prints its figures:

1. Labels: the packaged demo model (trained on phantoms). The float32 OpenVINO network of the default
   mode is quantised by ``nncf.quantize`` with windows of ``--calibration`` phantoms (seeds 4000...) as
   the calibration set, laid out as the pipeline lays them out; then ``--phantoms`` fresh phantoms (seeds
   3000..., none used for calibration) are segmented in the default mode with both networks, the same
   sliding window, blending and post-processing, and each class's Dice of int8 labels against float32
   labels is reported (minimum over phantoms).
2. Speed (``--full-size``): seconds per 96^3 window of the full-size Swin UNETR (fixture weights, 32
   classes) in float32 and int8 (quantised with ``--full-size-calibration`` windows of a phantom), and
   the max |logit difference| between them on one window.

NNCF is not a dependency of UniversalSeg: ``pip install nncf`` to run this.

    python benchmarks/benchmark_int8.py [--phantoms 3] [--calibration 4] [--full-size] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pipeline_windows(segmenter, phantoms) -> list:
    """The windows the default mode feeds the network for these phantoms (preprocessed, MONAI's layout)."""
    from itertools import product

    import numpy as np

    from UniversalSegLib.preprocess import preprocess
    from UniversalSegLib.settings import window_layout

    meta = segmenter.checkpoint.metadata
    roi = meta.inference.roi_size
    windows = []
    for phantom in phantoms:
        volume = phantom.volume
        prep = preprocess(volume.array, volume.affine, **meta.preprocessing.as_kwargs(),
                          resample_dtype=np.dtype(segmenter.mode.resample_dtype).type).array
        pads = [max(r - n, 0) for n, r in zip(prep.shape, roi)]
        prep = np.pad(prep, [(p // 2, p - p // 2) for p in pads])
        starts = window_layout(prep.shape, roi, segmenter.overlap, segmenter.mode.placement)
        for x, y, z in product(*starts):
            window = prep[x:x + roi[0], y:y + roi[1], z:z + roi[2]]
            windows.append(np.ascontiguousarray(window[None, None], dtype=np.float32))
    return windows


def quantize_ir(xml: Path, windows: list, out: Path, subset: int, accurate: bool = False):
    """NNCF post-training quantisation of the IR at ``xml`` with ``windows`` as calibration data; saved to
    ``out`` (an .xml); returns the seconds it took. ``accurate``: NNCF's options for accuracy (mixed preset:
    asymmetric activations; full bias correction) instead of its defaults."""
    import nncf
    import openvino

    t0 = time.perf_counter()
    model = openvino.Core().read_model(str(xml))
    options = {"preset": nncf.QuantizationPreset.MIXED, "fast_bias_correction": False} if accurate else {}
    quantized = nncf.quantize(model, nncf.Dataset(windows), subset_size=min(subset, len(windows)), **options)
    openvino.save_model(quantized, str(out), compress_to_fp16=False)
    return time.perf_counter() - t0


def segment_with(segmenter, network, volume):
    """The segmenter's default-mode run with ``network`` as the window forward (its own preparation skipped)."""
    segmenter._openvino_network = lambda channels, roi_size, report, timings: network
    return segmenter.segment(volume)


def label_part(args, folder: Path) -> dict:
    from UniversalSegLib.checkpoints import load_checkpoint
    from UniversalSegLib.demo import demo_checkpoint_path
    from UniversalSegLib.helpers import dice_score
    from UniversalSegLib.phantom import generate_phantom
    from UniversalSegLib.pipeline import Segmenter
    from UniversalSegLib.runtime import OpenVINOWindowNetwork

    checkpoint = load_checkpoint(demo_checkpoint_path())
    settings = checkpoint.metadata.provenance["phantom"]
    names = {c.index: c.key for c in checkpoint.metadata.classes}

    def phantom(seed):
        return generate_phantom(seed, shape=tuple(settings["shape"]), spacing=tuple(settings["spacing"]),
                                orientation=settings["orientation"])

    fp32 = Segmenter(checkpoint, device="cpu", threads=args.threads, runtime="openvino")
    evaluation = [phantom(seed) for seed in range(3000, 3000 + args.phantoms)]
    reference = [fp32.segment(p.volume) for p in evaluation]  # also converts and caches the float32 network
    xml = fp32._openvino.path
    windows = pipeline_windows(fp32, [phantom(seed) for seed in range(4000, 4000 + args.calibration)])
    int8_xml = folder / "demo_int8.xml"
    seconds = quantize_ir(xml, windows, int8_xml, subset=args.subset, accurate=args.accurate)
    int8 = Segmenter(checkpoint, device="cpu", threads=args.threads, runtime="openvino")
    network = OpenVINOWindowNetwork(int8_xml, args.threads)
    dices: dict[str, list] = {}
    for p, ref in zip(evaluation, reference):
        mine = segment_with(int8, network, p.volume)
        for index, mask in ref.masks.items():
            dices.setdefault(names[index], []).append(dice_score(mine.masks[index], mask))
    worst = {k: round(min(v), 4) for k, v in dices.items()}
    return {"nncf_options": "accurate (mixed preset, full bias correction)" if args.accurate else "defaults",
            "phantoms": args.phantoms, "calibration_phantoms": args.calibration,
            "calibration_windows": min(args.subset, len(windows)), "quantize_s": round(seconds, 1),
            "min_dice_per_class_int8_vs_fp32": worst, "min_dice": min(worst.values()),
            "classes_below_0.99": sorted(k for k, v in worst.items() if v < 0.99)}


def speed_part(args, folder: Path) -> dict:
    import numpy as np
    import torch

    from benchmark_cpu import _fixture_checkpoint
    from UniversalSegLib.checkpoints import load_checkpoint
    from UniversalSegLib.phantom import generate_phantom
    from UniversalSegLib.pipeline import Segmenter
    from UniversalSegLib.runtime import OpenVINOWindowNetwork, prepare_openvino

    checkpoint = load_checkpoint(_fixture_checkpoint("swinunetr", folder))
    segmenter = Segmenter(checkpoint, device="cpu", threads=args.threads, runtime="openvino")
    channels = list(range(checkpoint.metadata.model.num_classes))
    fp32 = prepare_openvino(segmenter.model, channels, (96, 96, 96), args.threads)
    windows = pipeline_windows(segmenter, [generate_phantom(4100, shape=(160, 160, 160), spacing=(1.5, 1.5, 1.5))])
    step = max(1, len(windows) // args.full_size_calibration)
    calibration = windows[::step][:args.full_size_calibration]
    int8_xml = folder / "swinunetr_int8.xml"
    seconds = quantize_ir(fp32.path, calibration, int8_xml, subset=len(calibration))
    int8 = OpenVINOWindowNetwork(int8_xml, args.threads)
    window = torch.from_numpy(windows[len(windows) // 2])
    record = {"quantize_s": round(seconds, 1), "calibration_windows": len(calibration)}
    logits = {}
    for name, network in (("fp32", fp32), ("int8", int8)):
        logits[name] = network(window).numpy()  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            network(window)
            times.append(time.perf_counter() - t0)
        record[f"{name}_s_per_window"] = round(statistics.median(times), 2)
        network.release()
    record["max_abs_logit_diff"] = round(float(np.abs(logits["int8"] - logits["fp32"]).max()), 3)
    record["label_agreement_one_window"] = round(float(np.mean((logits["int8"] > 0) == (logits["fp32"] > 0))), 5)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--phantoms", type=int, default=3, help="0: skip the label comparison")
    parser.add_argument("--calibration", type=int, default=4, help="phantoms whose windows calibrate int8")
    parser.add_argument("--subset", type=int, default=300, help="calibration windows NNCF uses at most")
    parser.add_argument("--accurate", action="store_true",
                        help="NNCF's mixed preset and full bias correction instead of its defaults")
    parser.add_argument("--full-size", action="store_true", help="also time the full-size Swin UNETR window")
    parser.add_argument("--full-size-calibration", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    out: dict = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("UNIVERSALSEG_HOME", str(Path(tmp) / "home"))
        if args.phantoms:
            out["labels"] = labels = label_part(args, Path(tmp))
            print(json.dumps(labels), flush=True)
            print(f"int8 vs float32 OpenVINO labels, demo model, {args.phantoms} phantoms: min Dice per class "
                  f"{labels['min_dice']:.4f}; below 0.99: {labels['classes_below_0.99'] or 'none'}", flush=True)
        if args.full_size:
            out["full_size"] = speed = speed_part(args, Path(tmp))
            print(json.dumps(speed), flush=True)
            print(f"full-size Swin UNETR window: float32 {speed['fp32_s_per_window']} s, int8 "
                  f"{speed['int8_s_per_window']} s; max |dlogit| {speed['max_abs_logit_diff']}", flush=True)
    out["load_avg_after"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

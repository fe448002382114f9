"""``universalseg``: segment organs and tumours in CT from the command line.

    universalseg segment CT.nii.gz -o out/ --classes "liver, liver tumor, pancreas"
    universalseg demo out/            # offline: phantom CT + packaged demo model, Dice against the truth
    universalseg classes
    universalseg models list | download NAME | import FILE | info NAME|FILE | convert FILE OUT.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from . import __version__

__all__ = ["main", "EXIT_CODES"]

#: Exit codes (also printed by ``universalseg --help``).
EXIT_CODES = {
    0: "success",
    1: "unexpected internal error (please report it with the message)",
    2: "invalid command line: unknown option, unknown class name, unknown output format",
    3: "input problem: file missing or unreadable, not a CT, bad geometry or voxel values",
    4: "model problem: model not installed, checkpoint invalid, download failed",
    5: "output problem: output exists (use --overwrite), folder not writable",
    6: "device problem: GPU requested but not available, unsupported precision",
    130: "interrupted (Ctrl-C); nothing was written",
}


def _epilog() -> str:
    lines = ["exit codes:"] + [f"  {code:>3}  {text}" for code, text in EXIT_CODES.items()]
    return "\n".join(lines)


class _Failure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _classify(err: BaseException) -> int:
    """Map a library exception to the documented exit code."""
    from .checkpoints import CheckpointError
    from .device import DeviceError
    from .io.errors import OutputExistsError, OutputNotWritableError, UniversalSegIOError, DicomSegError
    from .models import ChecksumMismatch, ModelNotAvailable
    from .preprocess import InvalidImageError
    from .taxonomy import UnknownClassError
    from .text import TextEncoderUnavailable

    if isinstance(err, UnknownClassError):
        return 2
    if isinstance(err, (OutputExistsError, OutputNotWritableError, DicomSegError)):
        return 5
    if isinstance(err, (UniversalSegIOError, InvalidImageError)):
        return 3
    if isinstance(err, (CheckpointError, ModelNotAvailable, ChecksumMismatch, TextEncoderUnavailable)):
        return 4
    if isinstance(err, DeviceError):
        return 6
    if isinstance(err, FileExistsError):
        return 5
    return 1


# ------------------------------------------------------------------------------------------------
# segment


class _StageReporter:
    """Stage lines on stderr and a progress bar for the sliding window (quiet: nothing)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar = None
        self.stage = None
        self.t0 = time.perf_counter()

    def __call__(self, stage: str, fraction: float) -> None:
        if self.quiet:
            return
        if stage != self.stage:
            self.close()
            self.stage = stage
            if stage == "inference":
                from tqdm.auto import tqdm

                self.bar = tqdm(total=100, desc="inference (sliding window)", unit="%", file=sys.stderr,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
            else:
                print(f"[{time.perf_counter() - self.t0:7.1f} s] {stage}", file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.n = round(100 * fraction)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _class_table(model: str):
    """The class table of a model without loading its weights (to check class names first)."""
    from pathlib import Path

    from .checkpoints import read_metadata
    from .taxonomy import get_taxonomy

    path = Path(model).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        return read_metadata(path).classes
    return get_taxonomy()  # official checkpoints: the 32 official classes


def _cmd_segment(args: argparse.Namespace) -> int:
    from .api import plan_outputs, write_result
    from .io import read_volume
    from .models import resolve_model
    from .pipeline import Segmenter

    if args.classes is not None and args.all:
        raise _Failure(2, "Give either --classes or --all, not both.")
    if args.reference_mode and args.mode not in (None, "reference"):
        raise _Failure(2, f"--reference-mode contradicts --mode {args.mode}.")
    try:
        plan = plan_outputs(args.input, args.output, args.format)
    except ValueError as err:
        raise _Failure(2, str(err)) from err
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    plan.check(args.overwrite)  # fail before any slow step
    wanted = None if args.all else args.classes
    classes = _class_table(args.model).resolve(wanted) if wanted else None  # None: every class

    volume = read_volume(args.input, series_uid=args.series, force=args.force)
    say(f"input: {volume.describe()}")
    for note in volume.notes:
        say(f"note: {note}")
    checkpoint = resolve_model(args.model)
    segmenter = Segmenter(checkpoint, device=args.device, precision=args.precision, threads=args.threads,
                          mode="reference" if args.reference_mode else (args.mode or "default"))
    classes = segmenter.resolve(classes)
    plan.check(args.overwrite, volume.format)
    say(f"model: {checkpoint} ({segmenter.checkpoint.metadata.model.backbone}) on {segmenter.device}")
    say(f"classes ({len(classes)}): {', '.join(c.display_name for c in classes)}")

    reporter = _StageReporter(args.quiet)
    try:
        result = segmenter.segment(volume, classes, progress=reporter)
    finally:
        reporter.close()
    reporter("write", 0.0)
    written = write_result(result, plan, overwrite=args.overwrite)
    summary = dict(result.summary(), outputs={k: str(v) for k, v in written.items()})
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print(f"{'class':<30} {'voxels':>10} {'volume ml':>10} {'mean HU':>8}")
        for row in result.statistics():
            hu = "" if row.mean_hu is None else f"{row.mean_hu:8.1f}"
            print(f"{row.name:<30} {row.voxels:>10} {row.volume_ml:>10.1f} {hu:>8}")
        for name, path in written.items():
            print(f"wrote {name}: {path}")
    return 0


# ------------------------------------------------------------------------------------------------
# classes / models


def _cmd_classes(args: argparse.Namespace) -> int:
    from .taxonomy import get_taxonomy

    taxonomy = get_taxonomy()
    classes = taxonomy.resolve(args.search) if args.search else list(taxonomy)
    if args.json:
        print(json.dumps([c.to_dict() for c in classes], indent=1))
        return 0
    print(f"{'#':>3}  {'class':<28} {'kind':<7} synonyms")
    for c in classes:
        print(f"{c.index:>3}  {c.display_name:<28} {c.kind:<7} {', '.join(c.synonyms)}")
    if not args.search:
        print("\ngroups: " + "; ".join(f"{name}" for name in taxonomy.groups()))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from . import models
    from .checkpoints import convert_official_checkpoint, load_checkpoint, read_metadata

    if args.action == "list":
        for spec, path in models.list_models():
            state = f"installed: {path}" if path else "not installed"
            print(f"{spec.name:<10} {spec.backbone:<10} {spec.size_mb:>4} MB  {state}\n           {spec.description}")
        print(f"\ncache: {models.models_dir()}\nOfficial weights: CC BY-NC-ND 4.0 (non-commercial); see "
              "'universalseg models info NAME'.")
        return 0
    if args.action == "download":
        path = models.download_model(args.target, overwrite=args.overwrite, progress=not args.quiet)
        print(f"installed {args.target}: {path}")
        return 0
    if args.action == "import":
        path = models.import_model(args.target, name=args.name, overwrite=args.overwrite)
        print(f"imported: {path}")
        return 0
    if args.action == "convert":
        if not args.dest:
            raise _Failure(2, "convert needs a destination: universalseg models convert FILE OUT.safetensors")
        print(f"wrote: {convert_official_checkpoint(models.resolve_model(args.target), args.dest, overwrite=args.overwrite)}")
        return 0
    # info
    if args.target in models.REGISTRY and models.installed_path(args.target) is None:
        spec = models.REGISTRY[args.target]
        print(f"{spec.name}: {spec.description}\nsource: {spec.url}\nlicence: {spec.license}\nnot installed")
        return 0
    ckpt = load_checkpoint(models.resolve_model(args.target))
    meta = ckpt.metadata
    print(json.dumps({"file": ckpt.path, "backbone": meta.model.backbone, "classes": len(meta.classes),
                      "model": meta.model.to_dict(), "preprocessing": meta.preprocessing.to_dict(),
                      "inference": meta.inference.to_dict(), "embedding": meta.embedding,
                      "provenance": meta.provenance, "license": meta.license}, indent=1))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(args.output, seed=args.seed, checkpoint=args.checkpoint, device=args.device,
                      threads=args.threads, overwrite=args.overwrite, log=None if args.quiet else print)
    if args.quiet:
        print(f"mean Dice {result.mean_dice:.3f}; outputs in {result.output_dir}")
    return 0


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="universalseg", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog(),
        description="Segment 25 abdominal organs and 6 tumour types in CT (CLIP-Driven Universal Model).")
    parser.add_argument("--version", action="version", version=f"UniversalSeg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    seg = sub.add_parser("segment", help="segment a CT (NIfTI, NRRD, MHA/MHD file or DICOM folder)",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    seg.add_argument("input", help="CT file (.nii/.nii.gz/.nrrd/.mha/.mhd) or DICOM folder")
    seg.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    seg.add_argument("--classes", help='comma-separated names, e.g. "liver, liver tumor, kidneys" (default: all)')
    seg.add_argument("--all", action="store_true", help="all classes of the model (the default)")
    seg.add_argument("--model", default="swinunetr",
                     help="installed model name (swinunetr, unet) or a checkpoint file (default: swinunetr)")
    seg.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    seg.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="GPU only: bfloat16/float16 autocast (faster; float32 is exact)")
    seg.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    seg.add_argument("--format", help="comma-separated outputs: nifti, seg.nrrd, masks, dicom-seg, or all "
                                      "(default: nifti,seg.nrrd)")
    seg.add_argument("--series", help="DICOM SeriesInstanceUID to use when the folder holds several series")
    seg.add_argument("--force", action="store_true", help="segment even if the input does not look like a CT")
    seg.add_argument("--overwrite", action="store_true", help="replace existing output files")
    seg.add_argument("--mode", choices=["default", "fast", "reference"],
                     help="default: official windows, official bugs fixed, low memory; fast: the fewest windows "
                          "covering the body (about 3x faster on CPU, slightly different labels; see README); "
                          "reference: the official pipeline exactly, bugs included")
    seg.add_argument("--reference-mode", action="store_true", help="same as --mode reference")
    seg.add_argument("--quiet", action="store_true", help="no progress output")
    seg.add_argument("--json", action="store_true", help="print a JSON summary (per class: voxels, ml, mean HU)")
    seg.set_defaults(func=_cmd_segment)

    cls = sub.add_parser("classes", help="list the classes, their synonyms and groups")
    cls.add_argument("search", nargs="?", help="show only what this text resolves to")
    cls.add_argument("--json", action="store_true")
    cls.set_defaults(func=_cmd_classes)

    demo = sub.add_parser("demo", help="offline demo: segment a freshly generated phantom CT with the packaged "
                                       "demo model and score it against the phantom's truth")
    demo.add_argument("output", nargs="?", default="universalseg-demo", help="output folder (default: ./universalseg-demo)")
    demo.add_argument("--seed", type=int, help="phantom seed (default: random, printed so the run can be repeated)")
    demo.add_argument("--checkpoint", help="use another model instead of the packaged demo model")
    demo.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    demo.add_argument("--threads", type=int, help="CPU threads")
    demo.add_argument("--overwrite", action="store_true", help="replace existing output files")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=_cmd_demo)

    mod = sub.add_parser("models", help="list, download, import, inspect or convert models")
    mod.add_argument("action", choices=["list", "download", "import", "info", "convert"])
    mod.add_argument("target", nargs="?", help="model name (download/info) or file (import/info/convert)")
    mod.add_argument("dest", nargs="?", help="convert: output .safetensors file")
    mod.add_argument("--name", help="import: which model the file is (default: from its file name)")
    mod.add_argument("--overwrite", action="store_true")
    mod.add_argument("--quiet", action="store_true")
    mod.set_defaults(func=_cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "models" and args.action != "list" and not args.target:
        parser.error(f"models {args.action} needs a model name or file")
    try:
        return args.func(args)
    except _Failure as err:
        print(f"universalseg: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("universalseg: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as err:  # every library error is turned into one clear line and an exit code
        code = _classify(err)
        if code == 1:
            if os.environ.get("UNIVERSALSEG_DEBUG"):
                raise
            print(f"universalseg: internal error: {type(err).__name__}: {err}\n(set UNIVERSALSEG_DEBUG=1 to see "
                  "the traceback, and please report it)", file=sys.stderr)
        else:
            print(f"universalseg: error: {err}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())

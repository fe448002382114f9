"""``universalseg``: segment organs and tumours in CT from the command line.

    universalseg segment CT.nii.gz -o out/ --classes "liver, liver tumor, pancreas"
    universalseg demo out/            # offline: phantom CT + packaged demo model, Dice against the truth
    universalseg classes
    universalseg batch CT_FOLDER/ -o out/      # a whole corpus: resumable, review queue (see README)
    universalseg models list | download NAME | import FILE | info NAME|FILE | convert FILE OUT.safetensors
    universalseg review ~/ct      # review and correct in the browser (pip install "universalseg[web]")
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from . import __version__
from .errors import EXIT_CODES, Interrupted, UsageError, exit_code_of
from .io.formats import describe_formats
from .model_store import REGISTRY as MODEL_REGISTRY
from .settings import MODES, PRECISIONS, RUNTIMES

__all__ = ["main", "EXIT_CODES"]

def _epilog() -> str:
    lines = ["exit codes:"] + [f"  {code:>3}  {text}" for code, text in EXIT_CODES.items()]
    return "\n".join(lines)


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


def _cmd_segment(args: argparse.Namespace) -> int:
    from .api import segment_file
    from .io.formats import parse_formats

    if args.classes is not None and args.all:
        raise UsageError("Give either --classes or --all, not both.")
    if args.reference_mode and args.mode not in (None, "reference"):
        raise UsageError(f"--reference-mode contradicts --mode {args.mode}.")
    formats = parse_formats(args.format)  # an unknown name is a UsageError (exit 2)
    say = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    reporter = _StageReporter(args.quiet)
    try:
        result, written = segment_file(
            args.input, args.output, None if args.all else args.classes, model=args.model, device=args.device,
            precision=args.precision, threads=args.threads, formats=formats, series_uid=args.series,
            force=args.force, overwrite=args.overwrite,
            mode="reference" if args.reference_mode else (args.mode or "default"), runtime=args.runtime,
            progress=reporter, log=say)
    finally:
        reporter.close()
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
    from . import model_store as models
    from .checkpoints import convert_official_checkpoint, load_checkpoint

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
            raise UsageError("convert needs a destination: universalseg models convert FILE OUT.safetensors")
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


def _cmd_review(args: argparse.Namespace) -> int:
    try:  # the web extra is optional: the rest of the command works without it
        import trame_slicer  # noqa: F401  (the extra's main package; its absence means no extra)
        from UniversalSegWeb.cli import run_review
    except ImportError as error:
        raise UsageError(f"'universalseg review' needs the web extra ({error.name or error} is missing): "
                         'pip install "universalseg[web]"') from None
    return run_review(args)


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
                     help=f"installed model name ({', '.join(MODEL_REGISTRY)}) or a checkpoint file (default: swinunetr)")
    seg.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    seg.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                     help="GPU only: bfloat16/float16 autocast (faster; float32 is exact)")
    seg.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")
    seg.add_argument("--format", help=f"comma-separated outputs: {describe_formats()}")
    seg.add_argument("--series", help="DICOM SeriesInstanceUID to use when the folder holds several series")
    seg.add_argument("--force", action="store_true", help="segment even if the input does not look like a CT")
    seg.add_argument("--overwrite", action="store_true", help="replace existing output files")
    seg.add_argument("--mode", choices=list(MODES),
                     help="default: official windows, official bugs fixed, low memory; fast: the fewest windows "
                          "covering the body (about 3x faster on CPU, slightly different labels; see README); "
                          "reference: the official pipeline exactly, bugs included")
    seg.add_argument("--reference-mode", action="store_true", help="same as --mode reference")
    seg.add_argument("--runtime", choices=list(RUNTIMES),
                     help="where each window's network runs: auto (OpenVINO on a CPU when installed, about 2x "
                          "faster, same labels; PyTorch on a GPU and in the reference mode), torch, or openvino "
                          "(CPU only; pip install 'universalseg[openvino]'). Default: $UNIVERSALSEG_RUNTIME or auto")
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

    rev = sub.add_parser("review", help="review and correct segmentations in the browser (needs the web extra)",
                         description="Start the review page and print its address. It listens on 127.0.0.1 "
                                     "unless --host says otherwise; on any other address every connection needs "
                                     "the access token (generated and printed, or --token). The page opens and "
                                     "writes files only inside the given folders.")
    rev.add_argument("folders", nargs="*", metavar="FOLDER",
                     help="folders the page may open and write (CTs, batch folders, exports; default: the current one)")
    rev.add_argument("--allow", nargs="+", default=[], metavar="DIR", help="more allowed folders")
    rev.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this computer only)")
    rev.add_argument("--port", type=int, default=0, help="port (default: a free one, printed)")
    rev.add_argument("--token", help="access token (default: generated when --host is not a loopback address)")
    rev.add_argument("--model", help="model offered first: installed model name or checkpoint file "
                                     "(the packaged demo model and the downloaded models are always offered)")
    rev.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest accepted upload (default: 1024 MB)")
    rev.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    rev.add_argument("--runtime", choices=list(RUNTIMES), help="as for segment (default: $UNIVERSALSEG_RUNTIME or auto)")
    rev.set_defaults(func=_cmd_review)

    from .batch.cli import add_batch_commands

    add_batch_commands(sub, _epilog())
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "models" and args.action != "list" and not args.target:
        parser.error(f"models {args.action} needs a model name or file")
    from .io.atomic import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():  # batch systems (SLURM, Kubernetes) stop jobs with SIGTERM: same as Ctrl-C
            return args.func(args)
    except KeyboardInterrupt:
        print("universalseg: interrupted; nothing was written", file=sys.stderr)
        return Interrupted.exit_code
    except Exception as err:  # every library error is turned into one clear line and an exit code
        code = exit_code_of(err)
        if code == 1:
            if os.environ.get("UNIVERSALSEG_DEBUG"):
                raise
            print(f"universalseg: internal error: {type(err).__name__}: {err}\n(set UNIVERSALSEG_DEBUG=1 to see "
                  "the traceback, and please report it)", file=sys.stderr)
        else:
            print(f"universalseg: error: {err.user_message}", file=sys.stderr)
        return code


def console_main() -> int:
    """The ``universalseg`` command: :func:`main` in a process of its own, so the allocator is set up for
    big temporaries first (:func:`~UniversalSegLib.memory.tune_allocator`; :func:`main` itself, callable
    from a user's Python session, leaves the process's allocator alone)."""
    from .memory import tune_allocator

    tune_allocator()
    return main()


if __name__ == "__main__":
    sys.exit(console_main())

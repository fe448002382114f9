"""The ``universalseg batch`` and ``universalseg batch-merge`` commands (registered by the main CLI)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import BatchCasesFailed, Interrupted, UsageError
from ..io.formats import describe_formats
from ..settings import MODES, PRECISIONS, RUNTIMES

__all__ = ["add_batch_commands"]


def _cmd_batch(args: argparse.Namespace) -> int:
    from ..io.formats import parse_formats
    from .run import BatchOptions, parse_shard, run_batch
    from .worker import WorkerSettings

    if args.classes is not None and args.all:
        raise UsageError("Give either --classes or --all, not both.")
    try:
        formats = parse_formats(args.format)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.address and args.engine != "ray":
        raise UsageError("--address needs --engine ray.")
    segmentation = WorkerSettings(
        args.model, classes=None if args.all else args.classes, formats=formats, device=args.device,
        precision=args.precision, threads=args.threads, mode=args.mode or "default", runtime=args.runtime,
        force=args.force, cross_check=args.cross_check)
    options = BatchOptions(
        args.output, segmentation, overwrite=args.overwrite, retry_failed=args.retry_failed,
        shard=parse_shard(args.shard) if args.shard else None, engine=args.engine or "local", address=args.address,
        workers=args.workers, expected_volumes=args.expected_volumes, progress=not args.quiet)
    try:
        summary = run_batch(args.inputs, options)
    except (KeyboardInterrupt, Interrupted):
        print("universalseg: batch interrupted; finished cases are recorded (the case in progress was not), run "
              "the same command again to continue", file=sys.stderr)
        return Interrupted.exit_code
    for line in summary.lines():
        print(line)
    if options.shard is not None:
        print(f"after every shard has finished: universalseg batch-merge {args.output}")
    return BatchCasesFailed.exit_code if summary.failed else 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .run import write_review
    from .state import merge_into

    rows = merge_into(args.output)
    queue, report = write_review(Path(args.output), args.expected_volumes)
    failed = [r for r in rows if r.status == "failed"]
    print(f"{len(rows)} cases: {sum(r.status == 'done' for r in rows)} done, {len(failed)} failed, "
          f"{sum(r.status == 'running' for r in rows)} unfinished\nreview queue: {queue}\nreport: {report}")
    return BatchCasesFailed.exit_code if failed else 0


def add_batch_commands(sub, epilog: str) -> None:
    bat = sub.add_parser(
        "batch", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        help="segment many CTs (folders, globs, CSV/TSV lists): resumable, shardable, optional Ray, review queue")
    bat.add_argument("inputs", nargs="+", help="CT files, DICOM folders, folders of them, glob patterns, or a "
                                               ".csv/.tsv list (path, optional case id per row)")
    bat.add_argument("-o", "--output", required=True, help="batch folder: OUT/<case>/ outputs, batch.sqlite, "
                                                          "review_queue.csv, report.html")
    bat.add_argument("--classes", help='comma-separated names (default: all)')
    bat.add_argument("--all", action="store_true", help="all classes of the model (the default)")
    bat.add_argument("--model", default="swinunetr", help="installed model name or checkpoint file (default: swinunetr)")
    bat.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    bat.add_argument("--precision", default="float32", choices=PRECISIONS)
    bat.add_argument("--threads", type=int, help="CPU threads per worker")
    bat.add_argument("--format", help=f"per-case outputs: {describe_formats()}")
    bat.add_argument("--mode", choices=list(MODES), help="inference mode, as for segment")
    bat.add_argument("--runtime", choices=list(RUNTIMES), help="auto, torch or openvino, as for segment")
    bat.add_argument("--force", action="store_true", help="segment inputs that do not look like a CT")
    bat.add_argument("--overwrite", action="store_true", help="replace case folders not made by this batch")
    bat.add_argument("--retry-failed", action="store_true", help="run the cases that failed before again")
    bat.add_argument("--shard", metavar="K/N", help="take shard K of N (SLURM arrays); writes its own database, "
                                                    "combine with batch-merge")
    bat.add_argument("--engine", choices=["local", "ray"], help="local (default, in this process) or ray "
                                                                "(pip install 'universalseg[ray]')")
    bat.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    bat.add_argument("--workers", type=int, help="Ray actors (default: one per GPU, or per free CPU)")
    bat.add_argument("--cross-check", metavar="MODEL", help="also segment with a second model (e.g. unet) and "
                                                            "flag classes where the two disagree")
    bat.add_argument("--expected-volumes", metavar="SET|FILE",
                     help="expected organ volumes: ct (default, adult CT literature), phantom, or a JSON file")
    bat.add_argument("--quiet", action="store_true", help="no progress bar")
    bat.set_defaults(func=_cmd_batch)

    merge = sub.add_parser("batch-merge", help="combine the shard databases of a batch folder and write its "
                                               "review queue and report")
    merge.add_argument("output", help="the batch folder")
    merge.add_argument("--expected-volumes", metavar="SET|FILE", help="as for batch")
    merge.set_defaults(func=_cmd_merge)

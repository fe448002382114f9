"""What a run writes besides checkpoints (rank 0 only): CSV logs, a timestamped text log, a training-curve
plot, validation tables, TensorBoard events.

* ``train_log.csv``: one row per ``log_every`` steps: the loss and its BCE/Dice terms averaged over the
  interval and over all processes, the learning rate the logged step used, seconds and crops per second.
* ``train.log``: timestamped lines (set-up, embedding source, resume, every logged step, validation).
* ``progress.png``: training loss and validation mean Dice against the step, redrawn after a log row at
  most every ``PLOT_INTERVAL_S`` seconds, after every validation and at the end (matplotlib, when installed).
* ``validation.csv``: one row per validation (pooled mean Dice, per class Dice/NSD, tumour detection);
  ``validation/step_<N>_cases.csv`` (one row per scored case and class) and ``validation/step_<N>.json``
  (pooled and per-dataset tables with class names); ``summary.json``: the latest of those, plus the best.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

__all__ = ["RunLogs", "TRAIN_COLUMNS"]

logger = logging.getLogger("universalseg_training")

#: Seconds between two redraws of progress.png while training (drawing takes a few tenths of a second).
PLOT_INTERVAL_S = 30.0

TRAIN_COLUMNS = ["step", "loss", "bce", "dice", "pairs", "lr", "seconds", "crops_per_second"]


def _truncate(path: Path, start_step: int) -> None:
    """After a resume, drop rows the interrupted run logged beyond its last checkpoint."""
    if not path.is_file():
        return
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= start_step]
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(kept)


def _append(path: Path, columns: list[str], row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _read_column(path: Path, column: str) -> tuple[list[int], list[float]]:
    if not path.is_file():
        return [], []
    with open(path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get(column) not in (None, "")]
    return [int(r["step"]) for r in rows], [float(r[column]) for r in rows]


class RunLogs:
    """Every log file of one run; inactive (writes nothing) on ranks other than 0."""

    def __init__(self, output_dir: str | Path, start_step: int, active: bool, tensorboard: bool = True,
                 plot: bool = True):
        self.active = active
        self.writer = None
        self.folder = Path(output_dir)
        self.plot_enabled = plot
        self._plotted_at = -math.inf
        self._handler: logging.Handler | None = None
        if not active:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.train_csv = self.folder / "train_log.csv"
        self.validation_csv = self.folder / "validation.csv"
        _truncate(self.train_csv, start_step)
        _truncate(self.validation_csv, start_step)
        self._handler = logging.FileHandler(self.folder / "train.log", encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
        logger.addHandler(self._handler)
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.folder / "tensorboard"), purge_step=start_step or None)
            except ImportError:
                logger.info("TensorBoard is not installed (pip install 'universalseg-training[tensorboard]'); "
                            "writing CSV logs only.")

    def info(self, message: str, *args) -> None:
        if self.active:
            logger.info(message, *args)

    def write_json(self, name: str, data: dict) -> None:
        if self.active:
            (self.folder / name).write_text(json.dumps(data, indent=1, default=float))

    def train(self, row: dict) -> None:
        if not self.active:
            return
        _append(self.train_csv, TRAIN_COLUMNS, row)
        logger.info("step %d  loss %.4f  (bce %.4f, dice %.4f)  lr %.3g  %.2f crops/s", row["step"], row["loss"],
                    row["bce"], row["dice"], row["lr"], row["crops_per_second"])
        if self.writer is not None:
            for key in ("loss", "bce", "dice", "lr"):
                self.writer.add_scalar(f"train/{key}", row[key], row["step"])
        if time.monotonic() - self._plotted_at >= PLOT_INTERVAL_S:
            self.plot()

    def validation(self, step: int, result, classes) -> dict:
        """Write the validation tables of ``result`` (a merged ValidationResult); returns its summary."""
        summary = result.summary()
        if not self.active:
            return summary
        row = {"step": step, "cases": summary["cases"], "mean_dice": summary["mean_dice"]}
        key = {c.index: c.key for c in classes}
        for index, value in summary["dice"].items():
            row[f"dice_{key[index]}"] = value
        for index, value in summary["nsd"].items():
            row[f"nsd_{key[index]}"] = value
        for index, value in summary["detection"].items():
            row[f"sensitivity_{key[index]}"] = value["sensitivity"]
            row[f"specificity_{key[index]}"] = value["specificity"]
        self._append_widening(row)
        folder = self.folder / "validation"
        folder.mkdir(exist_ok=True)
        columns = ["dataset", "case_id", "class", "name", "truth_voxels", "predicted_voxels", "dice", "nsd", "tumor"]
        with open(folder / f"step_{step:08d}_cases.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(result.records)
        named = {"step": step, **result.named_summary(), "cases_table": f"validation/step_{step:08d}_cases.csv"}
        self.write_json(f"validation/step_{step:08d}.json", named)
        logger.info("validation at step %d: %d cases, mean Dice %.4f", step, summary["cases"], summary["mean_dice"])
        for name, value in named["dice"].items():
            logger.info("  %-28s Dice %.4f", name, value)
        for dataset, table in named["datasets"].items():
            logger.info("  dataset %-20s %d cases, mean Dice %.4f", dataset, table["cases"], table["mean_dice"])
        if self.writer is not None:
            self.writer.add_scalar("validation/mean_dice", summary["mean_dice"], step)
            for index, value in summary["dice"].items():
                self.writer.add_scalar(f"validation/dice/{key[index]}", value, step)
        self.plot()
        return summary

    def _append_widening(self, row: dict) -> None:
        columns = list(row)
        if self.validation_csv.is_file():
            with open(self.validation_csv, newline="") as handle:
                header = next(csv.reader(handle), [])
            columns = header + [c for c in columns if c not in header]
            if columns != header:  # new columns: rewrite with the wider header
                with open(self.validation_csv, newline="") as handle:
                    old = list(csv.DictReader(handle))
                with open(self.validation_csv, "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=columns)
                    writer.writeheader()
                    writer.writerows(old)
        _append(self.validation_csv, columns, row)

    def plot(self) -> None:
        """Redraw ``progress.png``: training loss (left axis) and validation mean Dice (right axis)."""
        if not (self.active and self.plot_enabled):
            return
        self._plotted_at = time.monotonic()
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.plot_enabled = False
            logger.info("matplotlib is not installed; no progress.png")
            return
        steps, losses = _read_column(self.train_csv, "loss")
        val_steps, dice = _read_column(self.validation_csv, "mean_dice")
        figure, axis = plt.subplots(figsize=(8, 4.5))
        axis.plot(steps, losses, color="tab:blue", label="training loss (BCE + Dice)")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        if val_steps:
            right = axis.twinx()
            right.plot(val_steps, [d if math.isfinite(d) else float("nan") for d in dice], "o-", color="tab:red",
                       label="validation mean Dice")
            right.set_ylabel("mean Dice")
            right.set_ylim(0, 1)
            right.legend(loc="upper right")
        axis.legend(loc="upper left")
        figure.tight_layout()
        target = self.folder / "progress.png"
        temporary = self.folder / ".progress.png.partial"
        figure.savefig(temporary, dpi=80, format="png")
        plt.close(figure)
        temporary.replace(target)

    def close(self) -> None:
        self.plot()
        if self.writer is not None:
            self.writer.close()
        if self._handler is not None:
            logger.removeHandler(self._handler)
            self._handler.close()

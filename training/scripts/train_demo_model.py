"""Train the demo model shipped as UniversalSegLib/data/demo/demo_model.safetensors (seeded, CPU-friendly).

The demo model is a tiny U-Net Universal Model (525k parameters) trained with masked back-propagation on
four partially labelled phantom datasets (BTCV-, WORD-, CT-ORG- and AMOS-like label sets: each leaves some
organs unlabelled, stored as background), 3000 steps of two 32^3 crops at 4.8 mm, one CPU thread (about
25 minutes). The command that made the committed checkpoint::

    python training/scripts/train_demo_model.py --work /tmp/universalseg_demo --install

Interrupt it at any time and run the same command again: training resumes from the last checkpoint
(every 50 steps) and ends with exactly the same weights as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from UniversalSegLib.checkpoints import load_checkpoint, save_checkpoint
from UniversalSegLib.taxonomy import Taxonomy
from UniversalSegLib.preprocess import PreprocessingParameters
from universalseg_training.config import TrainConfig
from universalseg_training.experiment import score_on_phantoms
from universalseg_training.phantoms import write_phantom_datasets
from universalseg_training.sampling import SamplingConfig
from universalseg_training.trainer import train

REPO = Path(__file__).resolve().parents[2]
DEMO_PATH = REPO / "UniversalSegLib" / "data" / "demo" / "demo_model.safetensors"

DATASETS = ("btcv", "word", "ctorg", "amos")
CLASSES = ("spleen", "right kidney", "left kidney", "gallbladder", "liver", "stomach", "aorta", "inferior vena cava",
           "pancreas", "right lung", "left lung", "colon", "intestine", "bladder", "left femoral head",
           "right femoral head")
NOT_SHIPPED = ("left_femoral_head", "right_femoral_head")
PHANTOM = {"shape": [96, 96, 96], "spacing": [3.2, 3.2, 3.2], "orientation": "LPS"}
SEED = 2026


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/universalseg_demo"))
    parser.add_argument("--cases", type=int, default=5, help="phantoms per dataset")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-cases", type=int, default=4)
    parser.add_argument("--install", action="store_true", help=f"copy the result to {DEMO_PATH}")
    args = parser.parse_args()

    data = args.work / "data"
    specs = sorted(data.glob("*/dataset.json"))
    if len(specs) != len(DATASETS):
        specs = write_phantom_datasets(data, DATASETS, cases=args.cases, base_seed=SEED, shape=tuple(PHANTOM["shape"]),
                                       spacing=tuple(PHANTOM["spacing"]), orientation=PHANTOM["orientation"])
    config = TrainConfig(
        datasets=tuple(str(p) for p in specs), output_dir=str(args.work / "run"), backbone="unet", model_size="tiny",
        embedding="onehot", classes=CLASSES, steps=args.steps, batch_size=2, lr=2e-3, warmup_steps=30, seed=SEED,
        preprocessing=PreprocessingParameters(spacing=(4.8, 4.8, 4.8)), sampling=SamplingConfig(roi_size=(32, 32, 32)),
        checkpoint_every=50, log_every=25, threads=args.threads, progress=True)
    start = time.perf_counter()
    result = train(config)
    print(f"training: {result.steps} steps (resumed from {result.resumed_from}) in {time.perf_counter() - start:.0f} s")

    checkpoint = load_checkpoint(result.final_checkpoint)
    # The femoral heads are learnt but not shipped: a 32^3 crop at 4.8 mm (154 mm) centred on one femoral head
    # does not reach the midline, so the network cannot tell the left head from the right one (measured: both
    # channels fire on the same head in some phantoms). The head is per class, so dropping two classes leaves
    # every other output unchanged.
    keep = [info for info in checkpoint.metadata.classes if info.key not in NOT_SHIPPED]
    rows = [checkpoint.metadata.channel_of(info) for info in keep]
    # (The one-hot vocabulary of the embedding info stays the training one: the rows keep their positions.)
    checkpoint = checkpoint.with_classes(Taxonomy(keep), checkpoint.label_embeddings[rows], checkpoint.metadata.embedding)
    metadata = checkpoint.metadata
    metadata.provenance.update({
        "phantom": PHANTOM,
        "command": "python training/scripts/train_demo_model.py --work /tmp/universalseg_demo --install",
        "training_data": f"UniversalSeg phantoms, datasets {', '.join(DATASETS)} x {args.cases} cases, seed {SEED}",
        "purpose": "offline demo on phantoms only; not for real CT",
    })
    metadata.license = "Apache-2.0 (trained by the UniversalSeg developers on procedural phantoms only)"
    packaged = args.work / "demo_model.safetensors"
    save_checkpoint(packaged, checkpoint.state_dict, metadata, overwrite=True)

    seeds = tuple(range(5000, 5000 + args.eval_cases))
    scores = score_on_phantoms(packaged, seeds, shape=PHANTOM["shape"], spacing=PHANTOM["spacing"], threads=args.threads)
    table = {name: float(np.mean(values)) for name, values in scores.items()}
    for name, value in table.items():
        print(f"{name:<22} {value:.3f}")
    print(f"{'mean':<22} {np.mean(list(table.values())):.3f}  (fresh phantoms, seeds {seeds[0]}..{seeds[-1]})")
    (args.work / "demo_eval.json").write_text(json.dumps({"seeds": list(seeds), "dice": table}, indent=1))
    if args.install:
        DEMO_PATH.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(packaged, DEMO_PATH)
        print(f"installed {DEMO_PATH} ({DEMO_PATH.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()

"""UniversalSeg training: one model from many partially labelled CT datasets.

Modules, one job each:

* :mod:`.spec`: declarative per-dataset specifications (YAML/JSON) and their validation;
* :mod:`.assembly`: harmonise a dataset's label map to the taxonomy (merges, left/right split by patient
  side, annotated vs unknown classes);
* :mod:`.preprocessing`: MONAI transforms to the training grid and a persistent on-disk cache;
* :mod:`.sampling`: uniform sampling over datasets, positive/negative crops, augmentations;
* :mod:`.loss`: BCE + Dice over annotated classes only (masked back-propagation);
* :mod:`.trainer`: the training loop (AdamW, warm-up cosine, DDP, checkpoints, exact resume, logs);
* :mod:`.evaluation`: Dice, NSD and patient-level tumour detection;
* :mod:`.export`: library checkpoints, fine-tuning to new class names;
* :mod:`.phantoms`: partially labelled phantom datasets written to disk for experiments and the demo.
"""
__version__ = "0.1.0"

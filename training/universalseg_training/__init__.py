"""UniversalSeg training: one model from many partially labelled CT datasets.

Modules, one job each:

* :mod:`.spec`: declarative per-dataset specifications (YAML/JSON) and their validation;
* :mod:`.presets`: specifications of the official training datasets (label values, sampling);
* :mod:`.assembly`: harmonise a dataset's label map to the taxonomy (merges, left/right split by patient
  side, annotated vs unknown classes);
* :mod:`.preprocessing`: MONAI transforms to the training grid, a persistent on-disk cache with a bounded
  in-memory part;
* :mod:`.sampling`: uniform sampling over datasets, per-dataset crops and zoom, augmentations;
* :mod:`.loss`: BCE + Dice over annotated classes only (masked back-propagation);
* :mod:`.trainer`: the training loop (set-up, resume, steps, validation, export);
* :mod:`.state`: training-state checkpoints, exact resume and its checks;
* :mod:`.distributed`: process groups and collectives for DDP, rank checksums;
* :mod:`.run_logs`: CSV and text logs, progress plot, validation tables;
* :mod:`.evaluation`: Dice, NSD and patient-level tumour detection, per case and dataset;
* :mod:`.embeddings`: label embeddings (CLIP, the official file, one-hot);
* :mod:`.pretrained`: self-supervised / Models Genesis backbone initialisation;
* :mod:`.export`: the model set-up, library checkpoints, fine-tuning to new class names;
* :mod:`.splits`: seeded k-fold splits;
* :mod:`.phantoms`: partially labelled phantom datasets written to disk for experiments and the demo.
"""
__version__ = "0.1.0"

"""Batch segmentation of a whole corpus: resumable, shardable, optionally on Ray, with a review queue.

* :mod:`.inputs`: the cases of a batch from folders, globs or a CSV/TSV list.
* :mod:`.state`: the batch's SQLite database (one writer: the driver) and the corpus view over shards.
* :mod:`.worker`: the work on one case (segment, write outputs, measure quality signals), shared by engines.
* :mod:`.engine_local`: runs the cases in this process; :mod:`.engine_ray`: in Ray actors.
* :mod:`.quality`: per-class quality signals from the model's own probabilities and masks.
* :mod:`.queue`: priorities, the review queue CSV; :mod:`.report`: the self-contained HTML report.
* :mod:`.run`: the batch command's flow (plan, run, summarise).
"""

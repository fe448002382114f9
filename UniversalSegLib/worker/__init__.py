"""The inference worker: a separate Python process that keeps a model loaded between requests.

3D Slicer never imports PyTorch or MONAI into its own process: its module sends requests to this worker
(:class:`~.client.WorkerProcess`), which loads the model once (:mod:`.server`) and answers through
files in a private folder (:mod:`.protocol`). This package's ``__init__``, ``client`` and ``protocol``
are torch-free; only the worker process imports the pipeline.
"""
from .client import WorkerProcess, library_path
from .protocol import WorkerDied, WorkerFailure, WorkerResult, error_from_event, read_result

__all__ = ["WorkerProcess", "WorkerDied", "WorkerFailure", "WorkerResult", "error_from_event", "read_result",
           "library_path"]

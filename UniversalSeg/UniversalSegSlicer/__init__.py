"""Qt-free logic of the UniversalSeg 3D Slicer module.

Everything the module does except drawing its panel lives here and imports no ``qt``, ``ctk`` or
``slicer.ScriptedLoadableModule``: it runs inside Slicer and under pytest on the ``slicer-core`` wheel.
The scene and module logics are passed in; nothing looks up the Slicer application.

Modules: :mod:`.logic` (the entry point, :class:`SegmentationLogic`; inference runs in the worker process
of :mod:`UniversalSegLib.worker`), :mod:`.jobs` (a worker request as the panel sees it), :mod:`.results`
(masks -> segments), :mod:`.clickselect`, :mod:`.review`, :mod:`.export`, :mod:`.batch_review` (a batch
folder's queue and cases), :mod:`.statistics`,
:mod:`.classes` (class picker), :mod:`.dependencies`, :mod:`.estimate`, :mod:`.parameters`,
:mod:`.messages`, :mod:`.terminology` (the extension's terminology context), :mod:`.snapshots` (offscreen
pictures).
"""
from .classes import PRESETS, ClassCatalog
from .jobs import BackgroundJob, JobCancelled, JobState
from .logic import ModelChoice, SegmentationLogic
from .results import AppliedResult, ExistingSegmentsError
from .review import REVIEW_STATES

__all__ = ["PRESETS", "ClassCatalog", "BackgroundJob", "JobCancelled", "JobState", "ModelChoice",
           "SegmentationLogic", "AppliedResult", "ExistingSegmentsError", "REVIEW_STATES"]

"""The browser front-end of UniversalSeg: ``universalseg review`` (a trame-slicer page).

It binds page controls to the Qt-free logic of the Slicer module (:mod:`UniversalSegSlicer`): the same
:class:`~UniversalSegSlicer.logic.SegmentationLogic` and worker process, batch review, class catalogue,
review states and "Export for training". Nothing here decides how a CT is segmented, reviewed or
exported.

Modules: :mod:`.app` (the session: controls bound to the logic), :mod:`.page` (the page's widgets), :mod:`.cli` (the ``review`` subcommand's body),
:mod:`.access` (access token), :mod:`.folders` (allowed folders, listing, uploads), :mod:`.locks` (case
locks between review sessions).

Needs the ``web`` extra: ``pip install "universalseg[web]"`` (trame-slicer and the ``slicer-core`` range it
supports); importing :mod:`.app` without it raises ImportError.
"""

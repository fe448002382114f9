"""Shared pytest fixtures: where the shared reference data lives, and how a missing file is treated.

The shared folder (real scans, fidelity fixtures, the official CLIP embedding file) sits beside the
repository as ``../shared`` and is never copied into the project. ``UNIVERSALSEG_SHARED`` overrides it.
Under ``CI=true`` a missing shared file fails the test; elsewhere it is skipped with the reason.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("UNIVERSALSEG_SHARED", REPO_ROOT.parent / "shared")).resolve()
FIXTURE_DIR = SHARED_DIR / "reference" / "fixture"
DATA_DIR = SHARED_DIR / "data"
# The suite exercises the PyTorch forward unless a test asks for a runtime: "auto" would convert every test
# model to OpenVINO where it is installed. Testing/test_runtime.py tests OpenVINO and "auto" explicitly.
os.environ.setdefault("UNIVERSALSEG_RUNTIME", "torch")

# The verdict of a run is pytest's exit status. After pytest has finished, the interpreter's finalization
# tears down what the suite loaded in this process (VTK objects of slicer-core with Python observers, the
# thread pools of OpenVINO, oneDNN and Ray); once in three full runs (2026-12-01) that teardown jumped into
# freed memory (SIGSEGV after "585 passed"), turning a passing run into a failed one. The process therefore
# ends with pytest's status as soon as pytest is done. UNIVERSALSEG_TEST_FINALIZE=1 keeps the finalization
# (to look for such crashes); the product's own processes are tested in subprocesses with their exit codes.
_session_status: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _session_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _session_status and not os.environ.get("UNIVERSALSEG_TEST_FINALIZE"):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_session_status[-1])


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_shared(relative: str) -> Path:
    """Path of a file or folder under the shared folder; fail in CI, skip elsewhere, when it is missing."""
    path = SHARED_DIR / relative
    if not path.exists():
        message = f"shared file missing: {path} (set UNIVERSALSEG_SHARED to the shared folder)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture
def shared():
    """``shared("reference/fixture/expected_unet.npz")`` -> Path, with the CI/skip rule applied."""
    return require_shared


def make_weights_module():
    """The shared fixture's reference weight generator (``make_weights.py``), imported from its file."""
    import importlib.util

    path = require_shared("reference/fixture/make_weights.py")
    spec = importlib.util.spec_from_file_location("universalseg_fixture_make_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fixture_state_dict(backbone: str):
    """Deterministic fixture weights of the official model (keys in official order) as torch tensors."""
    import numpy as np
    import torch

    keys = require_shared(f"reference/fixture/keys_{backbone}.json")
    state, _ = make_weights_module().build(str(keys))
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}


def write_released_style_checkpoint(backbone: str, path: Path) -> Path:
    """Write the fixture weights the way the official release lays them out (``{'net': {'module.'+key}}``)."""
    import torch

    torch.save(make_weights_module().to_released_style(fixture_state_dict(backbone), backbone), path)
    return path


def fixture_input():
    """The fixture's model input: ``default_rng(0)`` standard normal, (1, 1, 96, 96, 96) float32."""
    import numpy as np
    import torch

    return torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, 96, 96, 96)).astype(np.float32))


def small_checkpoint(path: Path, backbone: str = "unet", spacing: float = 5.0, roi: int = 32, seed: int = 0) -> Path:
    """A reduced-width model with seeded random weights, saved as a UniversalSeg checkpoint.

    Coarse spacing (5 mm: no source voxel of a 3 mm CT falls exactly halfway between two output voxels,
    where nearest-neighbour ties would make oblique comparisons fragile) and small windows keep a whole-CT run to a few seconds on 2 CPU cores; the network's
    output is arbitrary but deterministic, which is what geometry, I/O and CLI tests need.
    """
    import torch

    from UniversalSegLib.checkpoints import CheckpointMetadata, save_checkpoint
    from UniversalSegLib.inference import InferenceParameters
    from UniversalSegLib.model import ModelConfig, UniversalModel
    from UniversalSegLib.preprocess import PreprocessingParameters
    from UniversalSegLib.taxonomy import get_taxonomy

    torch.manual_seed(seed)
    config = ModelConfig.small(backbone)
    model = UniversalModel(config)
    model.organ_embedding.copy_(torch.randn(config.num_classes, config.embedding_dim))
    meta = CheckpointMetadata(
        model=config, classes=get_taxonomy(), preprocessing=PreprocessingParameters(spacing=(spacing,) * 3),
        inference=InferenceParameters(roi_size=(roi,) * 3), provenance={"origin": "test: random weights"})
    return save_checkpoint(path, model.state_dict(), meta)


def segment_editor(headless, segmentation_node, volume_node):
    """Slicer's segment editor logic on a headless scene (what Paint, Draw, Islands... call), and its node."""
    import slicer

    editor = slicer.vtkSlicerSegmentEditorLogic()
    editor.SetMRMLScene(headless.scene)
    editor.SetMRMLApplicationLogic(headless.application_logic)
    editor_node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor.SetSegmentEditorNode(editor_node)
    editor.SetSegmentationNode(segmentation_node)
    editor.SetSourceVolumeNode(volume_node)
    return editor, editor_node

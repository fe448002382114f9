"""The module's settings kept in the scene's parameter node (saved with the scene).

Per-scene choices (input, output, classes, model, device) live in the parameter node
(``vtkMRMLScriptedModuleNode``); per-user defaults (last model, device, export folder) live in Slicer's
application settings, handled by the widget with :data:`SETTINGS_KEYS`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from UniversalSegLib.settings import RUNTIMES as LIBRARY_RUNTIMES

from UniversalSegLib.settings import MODES as _LIBRARY_MODES

__all__ = ["ModuleParameters", "SETTINGS_KEYS", "DEVICES", "MODES", "RUNTIMES"]

#: Device choices offered: value -> label.
DEVICES = (("auto", "Automatic (GPU when available)"), ("cuda", "GPU (CUDA)"), ("cpu", "CPU"))
#: Inference modes offered: value -> label.
MODES = tuple((mode.name, mode.label) for mode in _LIBRARY_MODES.values())
#: Where each window's network runs (UniversalSegLib.settings.RUNTIMES): value -> label.
RUNTIMES = tuple(LIBRARY_RUNTIMES.items())
#: Application-settings keys (QSettings) for per-user defaults.
SETTINGS_KEYS = {"model": "UniversalSeg/Model", "device": "UniversalSeg/Device",
                 "export_folder": "UniversalSeg/ExportFolder", "show_3d": "UniversalSeg/Show3D",
                 "mode": "UniversalSeg/Mode", "runtime": "UniversalSeg/Runtime"}

_INPUT_REFERENCE = "InputVolume"
_OUTPUT_REFERENCE = "OutputSegmentation"


@dataclass
class ModuleParameters:
    input_volume_id: str | None = None
    output_segmentation_id: str | None = None
    classes: list[str] = field(default_factory=list)  # class keys
    model: str = "swinunetr"  # registered model name or checkpoint path
    device: str = "auto"
    show_3d: bool = False  # closed surfaces are built on the main thread: opt-in (slow on large CTs)
    mode: str = "default"
    runtime: str = "auto"
    #: Show the fast layout's result first, then the exact one (CPU runs in the default mode); None: not
    #: chosen yet, the panel decides from the device (on for a CPU, see SegmentationLogic.progressive_default).
    progressive: bool | None = None

    @classmethod
    def read(cls, node) -> "ModuleParameters":
        """Parameters stored in a ``vtkMRMLScriptedModuleNode`` (defaults for missing values)."""
        defaults = cls()
        classes = node.GetParameter("Classes")
        device = node.GetParameter("Device") or defaults.device
        mode = node.GetParameter("Mode") or defaults.mode
        runtime = node.GetParameter("Runtime") or defaults.runtime
        progressive = node.GetParameter("Progressive")
        return cls(
            input_volume_id=node.GetNodeReferenceID(_INPUT_REFERENCE),
            output_segmentation_id=node.GetNodeReferenceID(_OUTPUT_REFERENCE),
            classes=[key for key in classes.split(",") if key] if classes else [],
            model=node.GetParameter("Model") or defaults.model,
            device=device if device in dict(DEVICES) else defaults.device,
            show_3d=(node.GetParameter("Show3D") or ("true" if defaults.show_3d else "false")) == "true",
            mode=mode if mode in dict(MODES) else defaults.mode,
            runtime=runtime if runtime in dict(RUNTIMES) else defaults.runtime,
            progressive={"true": True, "false": False}.get(progressive, defaults.progressive),
        )

    def write(self, node) -> None:
        """Store into a parameter node in one modification (one GUI update)."""
        was_modifying = node.StartModify()
        try:
            node.SetNodeReferenceID(_INPUT_REFERENCE, self.input_volume_id)
            node.SetNodeReferenceID(_OUTPUT_REFERENCE, self.output_segmentation_id)
            node.SetParameter("Classes", ",".join(self.classes))
            node.SetParameter("Model", self.model)
            node.SetParameter("Device", self.device)
            node.SetParameter("Show3D", "true" if self.show_3d else "false")
            node.SetParameter("Mode", self.mode)
            node.SetParameter("Runtime", self.runtime)
            node.SetParameter("Progressive", "" if self.progressive is None else
                              ("true" if self.progressive else "false"))
        finally:
            node.EndModify(was_modifying)

"""UniversalSeg.py's classes built the way 3D Slicer builds them (see slicer_scripted_contract.py).

The slicer-core wheel has MRML but no ``slicer.ScriptedLoadableModule``, ``qt`` or application; the
contract stand-ins supply exactly the construction rules of Slicer's scripted-module base classes, so a
logic class whose bases break ``super().__init__()`` fails here as it fails in Slicer's ``setup()``.
"""
from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from conftest import REPO_ROOT

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is needed for MRML tests")

import slicer_scripted_contract as contract  # noqa: E402

MODULE_DIR = REPO_ROOT / "UniversalSeg"
sys.path.insert(0, str(MODULE_DIR))


@pytest.fixture
def module(monkeypatch):
    from UniversalSegLib.mrml import headless_scene

    contract.install(monkeypatch, headless_scene().scene)
    spec = importlib.util.spec_from_file_location("UniversalSeg", MODULE_DIR / "UniversalSeg.py")
    loaded = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "UniversalSeg", loaded)
    spec.loader.exec_module(loaded)
    return loaded


def test_logic_is_constructible_by_the_scripted_module_base_classes(module):
    logic = module.UniversalSegLogic()
    try:
        assert logic.moduleName == "UniversalSeg" and logic.isSingletonParameterNode
        assert logic.scene is slicer.mrmlScene
        node = logic.getParameterNode()
        assert node.GetAttribute("ModuleName") == "UniversalSeg" and node is logic.getParameterNode()
        from UniversalSegSlicer.parameters import ModuleParameters

        assert ModuleParameters.read(node) == ModuleParameters()
        assert not logic.worker.alive()  # no process (and no PyTorch) until the first run
    finally:
        logic.shutdown()


def test_the_contract_rejects_the_base_order_that_broke_the_panel(module):
    """The contract is not a formality: with the Qt-free logic after Slicer's base class (the order that
    gave every user an empty panel), construction fails exactly as in Slicer."""
    from UniversalSegSlicer import SegmentationLogic

    class BrokenLogic(module.ScriptedLoadableModuleLogic, SegmentationLogic):
        def __init__(self):
            module.ScriptedLoadableModuleLogic.__init__(self)
            SegmentationLogic.__init__(self, slicer.mrmlScene)

    with pytest.raises(TypeError, match="scene"):
        BrokenLogic()


def test_module_and_widget_construct_and_the_module_registers_its_self_test(module):
    parent = contract.ModuleParent(MODULE_DIR / "UniversalSeg.py")
    entry = module.UniversalSeg(parent)
    assert parent.title == "UniversalSeg" and parent.categories == ["Segmentation"]
    assert slicer.selfTests["UniversalSeg"] == entry.runTest
    # the panel's "Contributors" say what the Extensions Index entry says
    cmake = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = re.search(r'set\(EXTENSION_CONTRIBUTORS "([^"]*)"\)', cmake).group(1)
    assert parent.contributors == [person.strip() for person in re.split(r",\s*(?![^()]*\))", listed)]

    widget = module.UniversalSegWidget(contract.QWidget())
    assert widget.moduleName == "UniversalSeg" and widget.logic is None and not widget.timer.isActive()
    assert "moduleAboutToBeUnloaded(QString)" in slicer.app.moduleManager().connections


def _run_self_test(module, monkeypatch):
    """UniversalSegTest as Slicer's Self Tests module runs it; returns the messages it showed."""
    monkeypatch.setattr(contract.ScriptedLoadableModuleTest, "messages", [])
    case = module.UniversalSegTest()
    case.runTest()
    return case.messages


def test_self_test_runs_fully_when_the_dependencies_are_present(module, monkeypatch):
    messages = _run_self_test(module, monkeypatch)
    assert "Segmentation through the worker passed" in messages
    assert "Result import, review and export passed" in messages
    assert not any("skipped" in message for message in messages), messages


def test_self_test_skips_what_needs_missing_packages_and_says_so(module, monkeypatch):
    """An extension build machine has none of the pip packages: the self-test passes and names what it skipped."""
    from UniversalSegSlicer.dependencies import RequirementStatus, Requirement

    missing = lambda *args, **kwargs: [RequirementStatus(Requirement("torch>=2.1,<3"), None, "missing")]  # noqa: E731
    monkeypatch.setattr(module, "check_requirements", missing)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "nibabel" else real_find_spec(name, *args))
    messages = _run_self_test(module, monkeypatch)
    assert "Export check skipped: nibabel not installed" in messages
    assert any(m.startswith("Segmentation check skipped, dependencies not installed: torch") for m in messages)
    assert "Logic construction passed" in messages


class _CheckButton:
    """A checkable button as the widget's code sees it: setting ``checked`` emits toggled(bool)."""

    def __init__(self, slot):
        self._checked, self._slot = False, slot

    @property
    def checked(self):
        return self._checked

    @checked.setter
    def checked(self, value):
        if bool(value) != self._checked:
            self._checked = bool(value)
            self._slot(self._checked)


def test_click_to_select_leaves_no_global_state_behind(module, monkeypatch):
    """Place mode is global in Slicer: leaving click-to-select (button, Esc, leaving the module) resets its
    persistence; the helper markup is hidden from the data tree and never saved with the scene."""
    import types

    from UniversalSegLib.mrml import headless_scene

    headless = headless_scene()
    monkeypatch.setattr(slicer, "mrmlScene", headless.scene)
    monkeypatch.setattr(slicer.app, "applicationLogic", lambda: headless.application_logic, raising=False)
    markups = slicer.vtkSlicerMarkupsLogic()
    markups.SetMRMLScene(headless.scene)
    markups.SetMRMLApplicationLogic(headless.application_logic)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(markups=types.SimpleNamespace(logic=lambda: markups)),
                        raising=False)
    widget = module.UniversalSegWidget(contract.QWidget())
    widget.ui = types.SimpleNamespace(pickByClickButton=_CheckButton(widget.onPickByClick),
                                      clickResultLabel=types.SimpleNamespace(text=""))
    interaction = headless.application_logic.GetInteractionNode()

    widget.ui.pickByClickButton.checked = True
    assert interaction.GetCurrentInteractionMode() == interaction.Place and interaction.GetPlaceModePersistence()
    node = widget.clickNode
    assert node.GetHideFromEditors() and not node.GetSaveWithScene()

    interaction.SetCurrentInteractionMode(interaction.ViewTransform)  # the user pressed Esc
    assert not widget.ui.pickByClickButton.checked  # the button follows
    assert not interaction.GetPlaceModePersistence() and widget.clickNode is None
    assert not headless.scene.IsNodePresent(node)

    widget.ui.pickByClickButton.checked = True
    widget.parameterNode = None
    widget.exit()  # leaving the module ends click-to-select too
    assert not widget.ui.pickByClickButton.checked and not interaction.GetPlaceModePersistence()
    assert interaction.GetCurrentInteractionMode() == interaction.ViewTransform


def test_extension_terminology_is_generated_from_the_class_table_and_loads_at_startup(module, monkeypatch):
    """Portal/splenic vein and femoral heads are in no Slicer list: the module's .term.json defines them
    (generated from taxonomy.json, so colours and codes live in one place) and is loaded at start-up."""
    import types

    import vtk

    from UniversalSegLib.mrml import headless_scene
    from UniversalSegLib.taxonomy import UNIVERSALSEG_CONTEXT, get_taxonomy
    from UniversalSegSlicer.terminology import TERMINOLOGY_FILE, terminology_json

    assert TERMINOLOGY_FILE.read_text(encoding="utf-8") == terminology_json(), \
        "regenerate UniversalSeg/Resources/Terminology/UniversalSeg.term.json with terminology_json()"
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "Resources/Terminology/${MODULE_NAME}.term.json" in cmake

    terminologies = headless_scene().terminologies_logic
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        terminologies=types.SimpleNamespace(logic=lambda: terminologies)), raising=False)
    module.UniversalSeg(contract.ModuleParent(MODULE_DIR / "UniversalSeg.py"))
    (startup,) = slicer.app.connections["startupCompleted()"]
    startup()
    names = vtk.vtkStringArray()
    terminologies.GetLoadedTerminologyNames(names)
    assert UNIVERSALSEG_CONTEXT in [names.GetValue(i) for i in range(names.GetNumberOfValues())]
    own = [info for info in get_taxonomy() if info.terminology.context == UNIVERSALSEG_CONTEXT]
    assert sorted(info.index for info in own) == [10, 23, 24]
    category = slicer.vtkSlicerTerminologyCategory()
    assert terminologies.GetNthCategoryInTerminology(UNIVERSALSEG_CONTEXT, 0, category)
    offered = {}
    for number in range(terminologies.GetNumberOfTypesInTerminologyCategory(UNIVERSALSEG_CONTEXT, category)):
        kind = slicer.vtkSlicerTerminologyType()
        terminologies.GetNthTypeInTerminologyCategory(UNIVERSALSEG_CONTEXT, category, number, kind)
        modifiers = set()
        count = terminologies.GetNumberOfTypeModifiersInTerminologyType(UNIVERSALSEG_CONTEXT, category, kind) \
            if kind.GetHasModifiers() else 0
        for m in range(count):
            modifier = slicer.vtkSlicerTerminologyType()
            terminologies.GetNthTypeModifierInTerminologyType(UNIVERSALSEG_CONTEXT, category, kind, m, modifier)
            modifiers.add(modifier.GetCodeMeaning())
        offered[kind.GetCodeValue()] = modifiers
    for info in own:  # each class's type (and left/right modifier) is offered by the selector now
        entry = info.terminology
        assert entry.category.value == category.GetCodeValue()
        assert entry.type.value in offered, info.display_name
        if entry.type_modifier is not None:
            assert entry.type_modifier.meaning in offered[entry.type.value]
    taxonomy = get_taxonomy()
    assert taxonomy[2].color != taxonomy[3].color  # right and left kidney
    import math

    assert math.dist(taxonomy[6].color, taxonomy[7].color) > 100  # liver and stomach

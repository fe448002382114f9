"""Stand-ins for what a real 3D Slicer gives a scripted module and the slicer-core wheel does not.

These follow the construction rules of Slicer 5.8-5.10's ``Base/Python/slicer/ScriptedLoadableModule.py``
(a contract written from Slicer's documented behaviour, not a copy of its code, and not a mock of
UniversalSeg):

* ``ScriptedLoadableModule.__init__(parent)`` stores ``parent``, derives ``moduleName`` from the class
  name, resets the parent's title/categories/contributors... and registers ``runTest`` in ``slicer.selfTests``;
* ``ScriptedLoadableModuleWidget.__init__(parent=None)`` derives ``moduleName`` (class name minus
  "Widget"), keeps ``parent`` and its ``layout()``, and connects to the module manager; ``setup()``
  creates the module's logic; ``onReload`` calls ``slicer.util.reloadScriptedModule(moduleName)``;
* ``ScriptedLoadableModuleLogic.__init__(parent=None)`` calls ``super().__init__()`` with no arguments
  FIRST (cooperative), then derives ``moduleName`` (class name minus "Logic") and sets
  ``isSingletonParameterNode``; ``getParameterNode()`` returns the scene's singleton
  ``vtkMRMLScriptedModuleNode`` tagged with the module name, creating it when missing;
* ``ScriptedLoadableModuleTest`` is a ``unittest.TestCase`` whose ``delayDisplay`` shows a message;
* ``qt``/``ctk`` hold only what construction touches (a timer and settings) and record connections.

:func:`install` puts them into ``sys.modules``/``slicer`` through a pytest ``monkeypatch`` (undone after
the test), with the real MRML scene of the slicer-core wheel as ``slicer.mrmlScene``.
"""
from __future__ import annotations

import sys
import types
import unittest


class QObject:
    def __init__(self, *args, **kwargs):
        self.connections = {}

    def connect(self, signal, slot):
        self.connections.setdefault(signal, []).append(slot)
        return True

    def disconnect(self, signal, slot=None):
        self.connections.pop(signal, None)


class QTimer(QObject):
    def __init__(self, *args):
        super().__init__()
        self.interval, self.active, self.singleShot = 0, False, False

    def setInterval(self, msec):
        self.interval = msec

    def setSingleShot(self, value):
        self.singleShot = value

    def start(self, msec=None):
        self.active = True

    def stop(self):
        self.active = False

    def isActive(self):
        return self.active


class QSettings:
    values: dict = {}

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value):
        self.values[key] = value


class QVBoxLayout(QObject):
    def __init__(self, *args):
        super().__init__()
        self.widgets = []

    def addWidget(self, widget):
        self.widgets.append(widget)


class QWidget(QObject):
    def __init__(self, *args):
        super().__init__()
        self._layout = QVBoxLayout()

    def layout(self):
        return self._layout


def qt_module() -> types.ModuleType:
    qt = types.ModuleType("qt")
    qt.QObject, qt.QTimer, qt.QSettings, qt.QWidget, qt.QVBoxLayout = QObject, QTimer, QSettings, QWidget, QVBoxLayout
    return qt


class ModuleParent(QWidget):
    """What Slicer passes to a module's constructor (qSlicerScriptedLoadableModule): attributes, a path."""

    def __init__(self, path):
        super().__init__()
        self.path = str(path)
        self.title, self.categories, self.dependencies, self.contributors = "", [], [], []
        self.helpText = self.acknowledgementText = ""
        self.isEntered = False


class _ModuleManager(QObject):
    pass


class _Application(QObject):
    def __init__(self):
        super().__init__()
        self._manager = _ModuleManager()

    def moduleManager(self):
        return self._manager


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = ["Andras Lasso (PerkLab, Queen's University), Steve Pieper (Isomics)"]
        parent.helpText = parent.acknowledgementText = ""
        import slicer

        if not hasattr(slicer, "selfTests"):
            slicer.selfTests = {}
        slicer.selfTests[self.moduleName] = self.runTest

    def runTest(self, msec=100, **kwargs):
        raise NotImplementedError("the stand-in does not run self-tests")


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        import slicer

        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Widget"):
            self.moduleName = self.moduleName[:-6]
        self.developerMode = False
        self.parent = parent if parent is not None else QWidget()
        self.layout = self.parent.layout()
        slicer.app.moduleManager().connect("moduleAboutToBeUnloaded(QString)", self._onModuleAboutToBeUnloaded)

    def _onModuleAboutToBeUnloaded(self, moduleName):
        if moduleName == self.moduleName:
            self.cleanup()

    def setup(self):
        pass

    def cleanup(self):
        pass

    def onReload(self):
        import slicer

        slicer.util.reloadScriptedModule(self.moduleName)


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        super().__init__()  # no arguments: the next class in the MRO must accept none
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Logic"):
            self.moduleName = self.moduleName[:-5]
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        import slicer

        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node = scene.AddNode(node)
        if node.GetAttribute("ModuleName") != self.moduleName:
            node.SetAttribute("ModuleName", self.moduleName)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    """A ``unittest.TestCase`` (Slicer's is too); ``delayDisplay`` shows a message (here: collects it)."""

    messages: list = []

    def delayDisplay(self, message, msec=100):
        self.messages.append(message)


def install(monkeypatch, scene) -> None:
    """Make ``import qt, ctk, slicer.ScriptedLoadableModule`` and ``slicer.mrmlScene``/``slicer.app`` work."""
    import slicer
    import slicer.util

    monkeypatch.setitem(sys.modules, "qt", qt_module())
    monkeypatch.setitem(sys.modules, "ctk", types.ModuleType("ctk"))
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(scripted, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", scripted, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", _Application(), raising=False)
    monkeypatch.setattr(slicer, "selfTests", {}, raising=False)

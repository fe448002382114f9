"""The Slicer extension as files: module entry point, .ui, CMake packaging, dependencies, class picker.

The Qt widget cannot run here (no Slicer application), so UniversalSeg.py is checked by reading it:
its classes, that every widget it uses exists in the .ui file, and that the self-test drives the logic.
Packaging is checked by staging the library with the module's own CMake function (cmake -P) and
importing from the staged tree alone.
"""
from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT

MODULE_DIR = REPO_ROOT / "UniversalSeg"
sys.path.insert(0, str(MODULE_DIR))

from UniversalSegLib.taxonomy import Taxonomy, get_taxonomy  # noqa: E402
from UniversalSegSlicer.classes import ClassCatalog  # noqa: E402
from UniversalSegSlicer.dependencies import (  # noqa: E402
    DependencyError,
    Requirement,
    check_requirements,
    plan_installation,
    read_requirements,
    run_installation,
)
from UniversalSegSlicer.estimate import OPENVINO_SECONDS_PER_WINDOW, SECONDS_PER_WINDOW, estimate_run  # noqa: E402
from UniversalSegSlicer.jobs import BackgroundJob, JobState  # noqa: E402
from UniversalSegSlicer.messages import plain_message  # noqa: E402

MODULE_FILE = MODULE_DIR / "UniversalSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "UniversalSeg.ui"


# ----------------------------------------------------------------------------------- the module file
@pytest.fixture(scope="module")
def module_tree():
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def _classes(tree):
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _base_names(cls):
    return [base.id if isinstance(base, ast.Name) else ast.unparse(base) for base in cls.bases]


def test_module_file_has_the_scripted_module_classes(module_tree):
    classes = _classes(module_tree)
    assert _base_names(classes["UniversalSeg"]) == ["ScriptedLoadableModule"]
    assert _base_names(classes["UniversalSegWidget"]) == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    # the Qt-free logic first: ScriptedLoadableModuleLogic.__init__ calls super().__init__() without arguments
    assert _base_names(classes["UniversalSegLogic"]) == ["SegmentationLogic", "ScriptedLoadableModuleLogic"]
    assert _base_names(classes["UniversalSegTest"]) == ["ScriptedLoadableModuleTest"]
    # module-level imports: Slicer/Qt and the Qt-free package; never torch (installed later, on request)
    imported = {alias.name.split(".")[0] for node in module_tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert "torch" not in imported and "monai" not in imported
    assert {"qt", "ctk", "slicer", "UniversalSegSlicer"} <= imported


def test_self_test_runs_every_test_method_and_drives_the_logic(module_tree):
    test_class = _classes(module_tree)["UniversalSegTest"]
    methods = {node.name: node for node in test_class.body if isinstance(node, ast.FunctionDef)}
    tests = sorted(name for name in methods if name.startswith("test_"))
    assert len(tests) >= 3
    called = {node.func.attr for node in ast.walk(methods["runTest"])
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert set(tests) <= called and "setUp" in called
    calls = {ast.unparse(node.func) for name in tests for node in ast.walk(methods[name]) if isinstance(node, ast.Call)}
    assert "insert_class_masks" in calls and "logic.export_for_training" in calls and "logic.segment" in calls
    assert "read_training_case" in calls  # the exported case is read back by the training reader


def _ui_object_names():
    return {element.get("name") for element in ET.parse(UI_FILE).iter("widget")}


def test_every_widget_the_module_uses_exists_in_the_ui_file(module_tree):
    used = {node.attr for node in ast.walk(module_tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"}
    assert used, "the widget reads no self.ui.* at all?"
    missing = sorted(used - _ui_object_names())
    assert not missing, f"UniversalSeg.py uses widgets missing from UniversalSeg.ui: {missing}"
    # the node selectors get the scene through the .ui connections
    root = ET.parse(UI_FILE).getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert receivers == {"inputVolumeSelector", "outputSegmentationSelector"}
    assert root.find("widget").get("class") == "qMRMLWidget"


def test_widget_handlers_exist(module_tree):
    widget = _classes(module_tree)["UniversalSegWidget"]
    defined = {node.name for node in widget.body if isinstance(node, ast.FunctionDef)}
    referenced = {node.attr for node in ast.walk(widget) if isinstance(node, ast.Attribute)
                  and isinstance(node.value, ast.Name) and node.value.id == "self" and node.attr.startswith("on")}
    assert referenced <= defined, sorted(referenced - defined)


def test_qt_free_package_imports_without_qt_slicer_or_torch():
    package = MODULE_DIR / "UniversalSegSlicer"
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in {"qt", "ctk"}, f"{path.name} imports {name}"
                assert not name.startswith("slicer.ScriptedLoadableModule"), f"{path.name} imports {name}"
    code = ("import sys, UniversalSegSlicer, UniversalSegSlicer.logic, UniversalSegSlicer.snapshots, UniversalSegLib.worker, "
            "UniversalSegSlicer.dependencies, UniversalSegSlicer.parameters; "
            "heavy = [m for m in ('torch', 'monai', 'slicer', 'qt') if m in sys.modules]; "
            "assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(MODULE_DIR)])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT)


def test_model_metadata_and_classes_are_read_without_torch(tmp_path):
    """The widget's class list, estimate and licence come from the selected model's metadata, read in
    Slicer's process without PyTorch: a UniversalSeg checkpoint's header, or the registered model's."""
    from conftest import small_checkpoint
    from UniversalSegLib.checkpoints import load_checkpoint, save_checkpoint

    full = load_checkpoint(small_checkpoint(tmp_path / "full.safetensors"))
    classes = Taxonomy([full.metadata.classes[6], full.metadata.classes[27]])
    three = full.with_classes(classes, full.label_embeddings[[5, 26]])
    path = save_checkpoint(tmp_path / "two.safetensors", three.state_dict, three.metadata)
    code = ("import sys; from UniversalSegSlicer.logic import SegmentationLogic as L; "
            f"m = L.model_metadata({str(path)!r}); "
            f"assert m.model.backbone == 'unet' and [c.key for c in L.model_classes({str(path)!r})] == "
            "['liver', 'liver_tumor'], m; "
            "assert L.model_metadata('unet').model.backbone == 'unet' and len(L.model_classes('swinunetr')) == 32; "
            "assert L.model_metadata('clip_driven_universal_unet.pth').model.backbone == 'unet'; "
            "heavy = [m for m in ('torch', 'monai', 'safetensors') if m in sys.modules]; assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(MODULE_DIR)])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT)


# ----------------------------------------------------------------------------------------- CMake
def _cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(r"set\(" + variable + r"\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not found"
    return [item.replace("${MODULE_NAME}", "UniversalSeg") for item in match.group(1).split()]


def test_module_cmake_lists_every_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    for item in scripts + resources:
        assert (MODULE_DIR / item).is_file(), f"CMakeLists.txt lists a missing file: {item}"
    # UniversalSegWeb/ is the browser front-end (`universalseg review`, installed by pip), not part of the Slicer
    # extension: Slicer never loads it.
    on_disk = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py")
               if "__pycache__" not in p.parts and p.relative_to(MODULE_DIR).parts[0] != "UniversalSegWeb"}
    assert on_disk == set(scripts), f"not listed: {sorted(on_disk - set(scripts))}"
    resource_files = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert resource_files == set(resources), f"not listed: {sorted(resource_files - set(resources))}"
    assert "slicerMacroBuildScriptedModule" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_cmake_has_the_catalog_metadata():
    text = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    values = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"\)', text))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert values.get(key), key
    assert "PyTorch" in values["EXTENSION_DEPENDS"].split()
    assert values["EXTENSION_CATEGORY"] == "Segmentation"
    # icon and screenshot URLs point at files of this repository (raw GitHub URLs of the main branch)
    for url in [values["EXTENSION_ICONURL"], *values["EXTENSION_SCREENSHOTURLS"].split()]:
        relative = url.split("/main/", 1)[1]
        assert (REPO_ROOT / relative).is_file(), url
    assert (REPO_ROOT / "LICENSE").is_file()
    assert "add_subdirectory(UniversalSeg)" in text and "project(UniversalSeg)" in text


def test_packaged_module_carries_the_library(tmp_path):
    """Stage the library with the module's own CMake function, lay out qt-scripted-modules like Slicer's
    macro does, and import everything from that tree alone (no repository on the path)."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    stage, listing = tmp_path / "binary", tmp_path / "files.txt"
    driver = tmp_path / "stage.cmake"
    driver.write_text(
        f'include("{(MODULE_DIR / "UniversalSegLibrary.cmake").as_posix()}")\n'
        f'universalseg_stage_library("{(REPO_ROOT / "UniversalSegLib").as_posix()}" "{stage.as_posix()}" SCRIPTS DATA)\n'
        f'string(REPLACE ";" "\\n" _s "${{SCRIPTS}}")\nstring(REPLACE ";" "\\n" _d "${{DATA}}")\n'
        f'file(WRITE "{listing.as_posix()}" "SCRIPTS\\n${{_s}}\\nDATA\\n${{_d}}\\n")\n')
    subprocess.run([cmake, "-P", str(driver)], check=True, capture_output=True)
    lines = listing.read_text().split()
    scripts, data = lines[1:lines.index("DATA")], lines[lines.index("DATA") + 1:]
    library = REPO_ROOT / "UniversalSegLib"
    expected_py = {p.relative_to(library).as_posix() for p in library.rglob("*.py") if "__pycache__" not in p.parts}
    assert {Path(s).relative_to(stage / "UniversalSegLib").as_posix() for s in scripts} == expected_py
    assert "data/taxonomy.json" in data

    # what slicerMacroBuildScriptedModule + the data loop of UniversalSeg/CMakeLists.txt produce:
    modules = tmp_path / "qt-scripted-modules"
    for script in scripts:  # absolute SCRIPTS land at their path relative to the binary folder
        target = modules / Path(script).relative_to(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(script, target)
    for item in data:
        target = modules / "UniversalSegLib" / item
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(library / item, target)
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    for item in _cmake_list(text, "MODULE_PYTHON_SCRIPTS") + _cmake_list(text, "MODULE_PYTHON_RESOURCES"):
        target = modules / item
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(MODULE_DIR / item, target)
    code = ("import UniversalSegLib, UniversalSegSlicer.logic, UniversalSegLib.mrml; "
            "from UniversalSegLib.taxonomy import get_taxonomy; from UniversalSegSlicer.dependencies import read_requirements; "
            f"assert UniversalSegLib.__file__.startswith({str(modules)!r}), UniversalSegLib.__file__; "
            "assert len(get_taxonomy()) == 32 and len(read_requirements()) >= 10; "
            # the self-test's demo model and the terminology file are packaged; the worker starts from the tree
            "from UniversalSegLib.demo import demo_checkpoint_path; demo_checkpoint_path(); "
            "from UniversalSegSlicer.terminology import TERMINOLOGY_FILE; assert TERMINOLOGY_FILE.is_file(); "
            "import time; from UniversalSegLib.worker import WorkerProcess, library_path; "
            f"assert library_path() == {str(modules)!r}; w = WorkerProcess(); i = w.new_request_id(); got = []; "
            "w.send(i, 'status', got.append); t = time.time()\n"
            "while not got and time.time() - t < 60: w.poll(); time.sleep(0.02)\n"
            "w.stop(); assert got and got[0]['event'] == 'result', got; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(modules)
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# ---------------------------------------------------------------------------------------- dependencies
def _pyproject_dependencies() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]


def test_requirements_file_equals_the_pyproject_dependencies():
    ours = {(r.name.lower(), str(r.specifier)) for r in read_requirements()}
    pyproject = {(Requirement(t).name.lower(), str(Requirement(t).specifier)) for t in _pyproject_dependencies()}
    assert ours == pyproject


def test_dependency_check_and_install_plan():
    statuses = check_requirements()  # this test environment has everything
    assert all(status.ok for status in statuses), [s.describe() for s in statuses if not s.ok]
    fake = check_requirements([Requirement("torch>=99"), Requirement("numpy>=99"), Requirement("monai>=1.3,<2"),
                               Requirement("universalseg-no-such-package>=1.0")])
    assert [s.problem for s in fake] == ["incompatible", "incompatible", "", "missing"]
    plan = plan_installation(fake)
    assert plan.torch == ">=99"  # PyTorch through PyTorchUtils, never plain pip
    assert plan.pip == ["universalseg-no-such-package>=1.0"]
    assert [s.name for s in plan.blocked] == ["numpy"]  # Slicer's own numpy is never replaced
    assert "update Slicer" in plan.describe() and "PyTorch extension" in plan.describe()
    with pytest.raises(DependencyError, match="update Slicer"):
        run_installation(plan, pip_install=lambda packages: None, install_torch=lambda spec: None)

    calls = []
    fixable = plan_installation([s for s in fake if s.name != "numpy"])
    with pytest.raises(DependencyError, match="install the PyTorch extension"):
        run_installation(fixable, pip_install=calls.append, install_torch=None)
    assert calls == []  # nothing half-installed

    def pip_install(arguments):
        constraints = arguments[arguments.index("-c") + 1]
        calls.append((arguments[:arguments.index("-c")], Path(constraints).read_text().split()))

    run_installation(fixable, pip_install=pip_install, install_torch=lambda spec: calls.append(("torch", spec)) or "torch")
    from importlib.metadata import version

    # torch first, then pip under constraints that keep the installed PyTorch and numpy where they are
    assert calls == [("torch", ">=99"), (["universalseg-no-such-package>=1.0"],
                                          [f"torch=={version('torch')}", f"numpy=={version('numpy')}",
                                           f"simpleitk=={version('simpleitk')}"])]


def test_probe_import_reports_a_broken_package(tmp_path, monkeypatch):
    # a package whose metadata exists but whose import fails (like a half-installed PyTorch)
    site = tmp_path / "site"
    (site / "brokenpkg").mkdir(parents=True)
    (site / "brokenpkg" / "__init__.py").write_text("raise ImportError('libtorch_cpu.so: cannot open shared object file')\n")
    info = site / "brokenpkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenpkg\nVersion: 1.0\n")
    monkeypatch.syspath_prepend(str(site))
    from UniversalSegSlicer import dependencies

    monkeypatch.setitem(dependencies.IMPORT_NAMES, "brokenpkg", "brokenpkg")
    (status, fine) = check_requirements([Requirement("brokenpkg>=1"), Requirement("tqdm")], probe_imports=True)
    assert status.problem == "broken" and "libtorch_cpu.so" in status.describe() and fine.ok
    assert "brokenpkg" not in sys.modules  # probed in another process: nothing loaded (or locked) here


# ------------------------------------------------------------------------------------- class picker
def test_class_search_understands_synonyms_and_abbreviations():
    catalog = ClassCatalog()
    names = lambda text: [catalog.taxonomy[i].display_name for i in catalog.search(text)]  # noqa: E731
    assert names("ivc") == ["Inferior Vena Cava"]
    assert names("HCC") == ["Liver Tumor"]
    assert names("kid tum") == ["Kidney Tumor"]
    assert names("kidney") == ["Right Kidney", "Left Kidney", "Kidney Tumor", "Kidney Cyst"]
    assert names("oesophagus") == ["Esophagus"]
    assert "Portal Vein and Splenic Vein" in names("portal")
    assert names("abdominal organs") == [catalog.taxonomy[i].display_name for i in catalog.taxonomy.groups()["abdominal organs"]]
    assert len(catalog.search("")) == 32 and catalog.search("xyzzy") == []


def test_class_groups_and_presets():
    catalog = ClassCatalog()
    groups = catalog.groups()
    assert [g.title for g in groups] == ["Organs", "Vessels", "Tumours and cysts"]
    assert sum(len(g.classes) for g in groups) == 32
    presets = dict(catalog.presets())
    assert presets["Liver + liver tumour"] == [6, 27]
    assert len(presets["All classes"]) == 32 and len(presets["Abdominal organs"]) == 12
    taxonomy = get_taxonomy()
    small = ClassCatalog(Taxonomy([taxonomy[1], taxonomy[6], taxonomy[27]]))  # a model with three classes
    assert dict(small.presets()) == {"Liver + liver tumour": [6, 27], "All tumours and cysts": [27],
                                     "All classes": [1, 6, 27]}
    assert [info.index for info in small.resolve([6, "spleen"])] == [1, 6]
    assert ClassCatalog.describe([taxonomy[i] for i in range(1, 8)]) == \
        "Spleen, Right Kidney, Left Kidney, Gallbladder, ... (7 classes)"


# -------------------------------------------------------------------------------------------- jobs
def test_jobs_follow_the_worker_process_events():
    """A job is the panel's view of one worker request: progress, result, error and cancel (a real worker
    process; these requests need no model, so PyTorch is never imported)."""
    from UniversalSegLib.worker import WorkerProcess

    worker = WorkerProcess()
    try:
        def submit(op, **fields):
            request_id = worker.new_request_id()
            job = BackgroundJob(op, poll=worker.poll, on_cancel=lambda: worker.cancel(request_id))

            def listener(event):
                if event["event"] == "result":
                    job.succeed(event)
                elif event["event"] == "error":
                    job.fail(RuntimeError(event["message"]), event["details"])

            worker.send(request_id, op, listener, **fields)
            return job

        job = submit("status")
        assert job.wait(60) and job.state is JobState.SUCCEEDED
        assert job.result()["loaded"] is False and job.result()["pid"] == worker.process.pid
        failing = submit("no_such_request")
        assert failing.wait(10) and failing.state is JobState.FAILED
        assert "unknown worker request" in str(failing.error) and "Traceback" in failing.error_details
        with pytest.raises(RuntimeError):
            failing.result()
        job.report("inference", 0.5)  # a finished job ignores late events
        assert job.progress == 1.0
        running = BackgroundJob("progress")
        running.report("inference", 0.5)
        assert running.progress == pytest.approx(0.05 + 0.02 + 0.05 + 0.78 * 0.5)
        assert "50 %" in running.status_text
        running.cancel()
        assert running.done() and running.state is JobState.CANCELLED and running.status_text == "Cancelled"
    finally:
        worker.stop()
    assert worker.folder is None and not worker.alive()


# ---------------------------------------------------------------------------------------- estimate
def test_estimate_window_count_matches_the_library():
    from UniversalSegLib.inference import count_windows

    shape, spacing = (512, 512, 300), (0.8, 0.8, 1.5)
    cpu = estimate_run(shape, spacing, "swinunetr", "cpu", classes=32, threads=2)
    resampled = [round((n - 1) * s / 1.5 + 1) for n, s in zip(shape, spacing)]
    assert cpu.windows == count_windows(resampled, (96, 96, 96), 0.5)
    # measured 2-thread CPU time per window
    assert cpu.seconds == pytest.approx(cpu.windows * SECONDS_PER_WINDOW[("swinunetr", "cpu")], rel=1e-6)
    openvino = estimate_run(shape, spacing, "swinunetr", "cpu", classes=32, threads=2, runtime="openvino")
    assert openvino.seconds == pytest.approx(cpu.windows * OPENVINO_SECONDS_PER_WINDOW["swinunetr"], rel=1e-6)
    assert openvino.seconds < cpu.seconds / 3  # the same windows, OpenVINO's time per window
    unet = estimate_run(shape, spacing, "unet", "cpu", classes=32, threads=2, runtime="openvino")
    assert unet.seconds == pytest.approx(cpu.windows * OPENVINO_SECONDS_PER_WINDOW["unet"], rel=1e-6)
    gpu = estimate_run(shape, spacing, "swinunetr", "cuda", classes=32)
    assert gpu.seconds < cpu.seconds / 20 and gpu.gpu_gb > 0 and cpu.gpu_gb == 0
    small = estimate_run(shape, spacing, "swinunetr", "cpu", classes=2, threads=2)
    assert small.ram_gb < cpu.ram_gb  # per-class arrays dominate memory beyond the forward pass
    fast = estimate_run(shape, spacing, "swinunetr", "cpu", classes=32, threads=2, overlap=0.0)
    assert fast.windows == count_windows(resampled, (96, 96, 96), 0.0) < cpu.windows
    reference = estimate_run(shape, spacing, "swinunetr", "cpu", classes=32, threads=2, streaming=False)
    assert reference.windows == cpu.windows and reference.ram_gb > cpu.ram_gb + 2  # 32 full float32 maps


def test_plain_messages():
    assert "ran out of memory" in plain_message(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    from UniversalSegLib.errors import NotCTError

    assert plain_message(NotCTError("x.nii: not a CT")) == "x.nii: not a CT"
    assert "Python console" in plain_message(ZeroDivisionError("division by zero"))
    assert "Install dependencies" in plain_message(ModuleNotFoundError("No module named 'monai'", name="monai"))


# ----------------------------------------------------------------------------------------- pictures
def test_overlay_picture_is_in_radiological_orientation(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from UniversalSegSlicer.snapshots import render_overlay

    array = np.full((40, 30, 5), 40, dtype=np.int16)
    mask = np.zeros(array.shape, dtype=bool)
    mask[30:38, 10:20, :] = True  # high i = patient's right (RAS affine): must appear on the LEFT of the image
    taxonomy = get_taxonomy()
    path = render_overlay(tmp_path / "overlay.png", array, np.diag([1.0, 1.0, 1.0, 1.0]), {6: mask}, [taxonomy[6]],
                          [2], dpi=50)
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    liver = np.array(taxonomy[6].color)
    close = np.abs(pixels - liver).sum(axis=2) < 60  # opaque outline pixels in the class colour
    columns = np.flatnonzero(close.any(axis=0))
    assert columns.size and columns.mean() < pixels.shape[1] / 2


def test_three_d_picture_renders_offscreen(tmp_path):
    """Offscreen VTK (EGL/OSMesa), in subprocesses so that a missing GL driver cannot crash the test run.
    Skipped only when VTK cannot open any offscreen window on this machine."""
    pytest.importorskip("slicer")
    env = {**os.environ, "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow"}
    probe = ("import vtk; w = vtk.vtkRenderWindow(); w.SetOffScreenRendering(True); r = vtk.vtkRenderer(); "
             "w.AddRenderer(r); w.Render(); assert w.SupportsOpenGL()")
    if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=120).returncode != 0:
        pytest.skip("VTK cannot render offscreen here (install libegl1 libegl-mesa0 libgl1-mesa-dri or OSMesa)")
    code = f"""
import sys, numpy as np
sys.path[:0] = [{str(REPO_ROOT)!r}, {str(MODULE_DIR)!r}]
from UniversalSegLib.mrml import headless_scene, volume_node_from_volume
from UniversalSegLib.io.volume import Volume
from UniversalSegLib.taxonomy import get_taxonomy
from UniversalSegSlicer.results import insert_class_masks
from UniversalSegSlicer.snapshots import render_surfaces
h = headless_scene()
node = volume_node_from_volume(h.scene, Volume(np.zeros((30, 30, 30), np.int16), np.eye(4), "x", "mrml"), "x")
right = np.zeros((30, 30, 30), bool); right[20:28, 10:20, 10:20] = True   # high x: the patient's right
left = np.zeros((30, 30, 30), bool); left[2:8, 10:20, 10:20] = True
taxonomy = get_taxonomy()
applied = insert_class_masks(h.scene, node, {{6: right, 1: left}}, [taxonomy[1], taxonomy[6]])
render_surfaces({str(tmp_path / 'surface.png')!r}, applied.segmentation_node, size=(120, 120))
"""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    from PIL import Image

    pixels = np.asarray(Image.open(tmp_path / "surface.png").convert("RGB")).astype(int)
    shaded = np.abs(pixels - 255).sum(axis=2) > 30  # not background white
    assert 0.02 < shaded.mean() < 0.9
    red, blue = pixels[..., 0], pixels[..., 2]
    liver = shaded & (red - blue > 50)  # Liver (221, 130, 101): orange
    spleen = shaded & (blue >= red - 5)  # Spleen (157, 108, 162): purple
    assert liver.sum() > 20 and spleen.sum() > 20
    # front view: the patient's right (the liver block) appears on the viewer's left
    assert np.argwhere(liver)[:, 1].mean() < np.argwhere(spleen)[:, 1].mean()

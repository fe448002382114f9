"""Python packages UniversalSeg needs inside Slicer: what is missing or broken, and how to install it.

Rules (from Slicer's Python FAQ and what went wrong in other AI extensions):

* nothing is installed at import time or without the user's consent; the widget shows
  :meth:`InstallPlan.describe` and asks once;
* PyTorch comes from the PyTorch extension's ``PyTorchUtils`` (it picks the CUDA or CPU build that
  matches the machine), never from a bare ``pip install torch`` (which may give a CPU-only build);
* packages Slicer itself ships (numpy, SimpleITK) are never replaced: replacing them breaks other
  modules; if Slicer's version does not fit, the user must update Slicer;
* everything else is installed with version ranges (never pins), the same ranges as ``pyproject.toml``,
  under a pip constraints file that pins the installed PyTorch, numpy and SimpleITK (:data:`KEEP_INSTALLED`),
  so a new MONAI can never pull a different (CPU-only) PyTorch or move Slicer's numpy;
* nothing is imported into Slicer's process to check a package: presence and versions come from
  ``importlib.metadata``, and the optional import probe runs in a separate Python process (a DLL loaded
  by a probe would stay locked on Windows and block the installation).

The requirement list is ``Resources/requirements.txt`` of the module (a test keeps it equal to
``pyproject.toml``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Sequence

from UniversalSegLib.errors import UniversalSegError

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pragma: no cover - Slicer's Python always has pip, which vendors packaging
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement  # type: ignore
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore

__all__ = ["REQUIREMENTS_FILE", "SLICER_PROVIDED", "KEEP_INSTALLED", "IMPORT_NAMES", "RequirementStatus", "InstallPlan",
           "DependencyError", "read_requirements", "check_requirements", "probe_imports_elsewhere", "installed_pins",
           "plan_installation", "run_installation"]

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
#: Distributions that come with Slicer and must not be reinstalled with pip.
SLICER_PROVIDED = frozenset({"numpy", "simpleitk"})
#: Installed distributions a pip run must leave at their installed version (pinned in a constraints file).
KEEP_INSTALLED = ("torch", "numpy", "simpleitk")
#: Distribution name -> import name, where they differ or a probe import is wanted.
IMPORT_NAMES = {"torch": "torch", "monai": "monai", "einops": "einops", "numpy": "numpy",
                "safetensors": "safetensors", "nibabel": "nibabel", "simpleitk": "SimpleITK", "scipy": "scipy",
                "connected-components-3d": "cc3d", "tqdm": "tqdm"}


class DependencyError(UniversalSegError, RuntimeError):
    """A package UniversalSeg needs is missing, too old/new, or fails to import; the message says which."""


@dataclass(frozen=True)
class RequirementStatus:
    requirement: Requirement
    installed: str | None  # installed version, None when absent
    problem: str = ""  # "", "missing", "incompatible" or "broken"
    detail: str = ""

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    @property
    def ok(self) -> bool:
        return not self.problem

    def describe(self) -> str:
        wanted = f"{self.requirement.name}{self.requirement.specifier}"
        if self.problem == "missing":
            return f"{wanted}: not installed"
        if self.problem == "incompatible":
            return f"{wanted}: version {self.installed} is installed"
        if self.problem == "broken":
            return f"{wanted}: installed ({self.installed}) but cannot be imported: {self.detail}"
        return f"{wanted}: {self.installed} OK"


def read_requirements(path: str | Path | None = None) -> list[Requirement]:
    """Requirements from a requirements file (comments and blank lines ignored)."""
    path = Path(path) if path is not None else REQUIREMENTS_FILE
    requirements = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            requirements.append(Requirement(text))
        except InvalidRequirement as error:
            raise DependencyError(f"{path}, line {number}: invalid requirement {text!r}: {error}") from error
    return requirements


def probe_imports_elsewhere(modules: Sequence[str], python: str | None = None) -> dict[str, str]:
    """Import ``modules`` in a separate Python process (same ``sys.path``); ``{module: error}`` for those
    that fail. Nothing gets loaded into this process."""
    if not modules:
        return {}
    code = ("import importlib, json, sys\nfailed = {}\nfor name in sys.argv[1:]:\n    try:\n"
            "        importlib.import_module(name)\n    except BaseException as error:\n"
            "        failed[name] = f'{type(error).__name__}: {error}'\nprint(json.dumps(failed))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    completed = subprocess.run([python or sys.executable, "-c", code, *modules], capture_output=True, text=True,
                               env=env, timeout=300, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
    try:
        return json.loads(completed.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {name: f"the check could not run: {completed.stderr.strip()[-300:]}" for name in modules}


def check_requirements(requirements: Sequence[Requirement] | None = None, probe_imports: bool = False,
                       python: str | None = None) -> list[RequirementStatus]:
    """Status of every requirement in this Python: installed version against the range, and optionally
    whether the package actually imports (a half-installed PyTorch shows up only then), tried in a separate
    process started with ``python`` (default: this interpreter; in Slicer ``PythonSlicer``)."""
    requirements = read_requirements() if requirements is None else requirements
    out = []
    probes = {}
    for requirement in requirements:
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            out.append(RequirementStatus(requirement, None, "missing"))
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            out.append(RequirementStatus(requirement, version, "incompatible"))
            continue
        module = IMPORT_NAMES.get(canonicalize_name(requirement.name))
        if probe_imports and module:
            probes[len(out)] = module
        out.append(RequirementStatus(requirement, version))
    failed = probe_imports_elsewhere(sorted(set(probes.values())), python) if probes else {}
    for position, module in probes.items():
        if module in failed:
            status = out[position]
            out[position] = RequirementStatus(status.requirement, status.installed, "broken", failed[module])
    return out


def installed_pins(names: Iterable[str] = KEEP_INSTALLED) -> list[str]:
    """``name==version`` of the installed ones among ``names`` (the constraints of every pip run)."""
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


@dataclass
class InstallPlan:
    """What to install: PyTorch through PyTorchUtils, the rest with pip; ``blocked`` cannot be fixed here."""

    torch: str | None = None  # version specifier for PyTorchUtils, e.g. ">=2.1,<3"
    pip: list[str] = field(default_factory=list)
    blocked: list[RequirementStatus] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.torch is None and not self.pip

    def describe(self) -> str:
        """Plain text for the confirmation dialog."""
        lines = []
        if self.torch is not None:
            lines.append(f"PyTorch {self.torch} (through the PyTorch extension, matching your GPU or CPU)")
        lines.extend(self.pip)
        text = ""
        if lines:
            text = "UniversalSeg needs these Python packages:\n  " + "\n  ".join(lines)
            text += "\nThey are downloaded from the internet and installed into Slicer's Python (a few GB with PyTorch)."
        if self.blocked:
            text += ("\n" if text else "") + "These packages come with Slicer and cannot be changed here; update Slicer:\n  "
            text += "\n  ".join(status.describe() for status in self.blocked)
        return text


def plan_installation(statuses: Iterable[RequirementStatus]) -> InstallPlan:
    """Turn requirement statuses into an :class:`InstallPlan`."""
    plan = InstallPlan()
    for status in statuses:
        if status.ok:
            continue
        if status.name in SLICER_PROVIDED:
            plan.blocked.append(status)
        elif status.name == "torch":
            plan.torch = str(status.requirement.specifier) or ">=0"
        else:
            plan.pip.append(str(status.requirement))
    return plan


def run_installation(plan: InstallPlan, pip_install: Callable[[list[str]], None],
                     install_torch: Callable[[str], object] | None) -> None:
    """Carry out a plan the user agreed to: PyTorch first (so pip never pulls a CPU-only torch as a
    dependency of MONAI), then the rest in one pip call constrained to the installed PyTorch, numpy and
    SimpleITK (pip picks versions of the rest that work with them, or fails and changes nothing). Raises
    :class:`DependencyError` when PyTorch is needed but the PyTorch extension is not installed."""
    if plan.blocked:
        raise DependencyError(plan.describe())
    if plan.torch is not None:
        if install_torch is None:
            raise DependencyError("PyTorch is needed: install the PyTorch extension (Extensions Manager, "
                                  "category Utilities) and restart Slicer, then try again.")
        if install_torch(plan.torch) is None:
            raise DependencyError("PyTorch was not installed (cancelled or failed); see the Python console.")
    if plan.pip:
        pins = installed_pins()
        if not pins:
            pip_install(list(plan.pip))
            return
        with tempfile.TemporaryDirectory(prefix="universalseg-pip-") as folder:
            constraints = Path(folder) / "constraints.txt"
            constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
            pip_install(list(plan.pip) + ["-c", str(constraints)])

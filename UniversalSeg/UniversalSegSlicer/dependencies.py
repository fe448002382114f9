"""Python packages UniversalSeg needs inside Slicer: what is missing or broken, and how to install it.

Rules (from Slicer's Python FAQ and what went wrong in other AI extensions):

* nothing is installed at import time or without the user's consent; the widget shows
  :meth:`InstallPlan.describe` and asks once;
* PyTorch comes from the PyTorch extension's ``PyTorchUtils`` (it picks the CUDA or CPU build that
  matches the machine), never from a bare ``pip install torch`` (which may give a CPU-only build);
* packages Slicer itself ships (numpy, SimpleITK) are never replaced: replacing them breaks other
  modules; if Slicer's version does not fit, the user must update Slicer;
* everything else is installed with version ranges (never pins), the same ranges as ``pyproject.toml``.

The requirement list is ``Resources/requirements.txt`` of the module (a test keeps it equal to
``pyproject.toml``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Sequence

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # pragma: no cover - Slicer's Python always has pip, which vendors packaging
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement  # type: ignore
    from pip._vendor.packaging.utils import canonicalize_name  # type: ignore

__all__ = ["REQUIREMENTS_FILE", "SLICER_PROVIDED", "IMPORT_NAMES", "RequirementStatus", "InstallPlan",
           "DependencyError", "read_requirements", "check_requirements", "plan_installation", "run_installation"]

REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
#: Distributions that come with Slicer and must not be reinstalled with pip.
SLICER_PROVIDED = frozenset({"numpy", "simpleitk"})
#: Distribution name -> import name, where they differ or a probe import is wanted.
IMPORT_NAMES = {"torch": "torch", "monai": "monai", "einops": "einops", "numpy": "numpy",
                "safetensors": "safetensors", "nibabel": "nibabel", "simpleitk": "SimpleITK", "scipy": "scipy",
                "connected-components-3d": "cc3d", "tqdm": "tqdm"}


class DependencyError(RuntimeError):
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


def check_requirements(requirements: Sequence[Requirement] | None = None, probe_imports: bool = False) -> list[RequirementStatus]:
    """Status of every requirement in this Python: installed version against the range, and optionally
    whether the package actually imports (a half-installed PyTorch shows up only then)."""
    requirements = read_requirements() if requirements is None else requirements
    out = []
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
            try:
                importlib.import_module(module)
            except Exception as error:  # ImportError, OSError (missing DLL), RuntimeError (ABI mismatch)
                out.append(RequirementStatus(requirement, version, "broken", f"{type(error).__name__}: {error}"))
                continue
        out.append(RequirementStatus(requirement, version))
    return out


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
    dependency of MONAI), then the rest in one pip call. Raises :class:`DependencyError` when PyTorch is
    needed but the PyTorch extension is not installed."""
    if plan.blocked:
        raise DependencyError(plan.describe())
    if plan.torch is not None:
        if install_torch is None:
            raise DependencyError("PyTorch is needed: install the PyTorch extension (Extensions Manager, "
                                  "category Utilities) and restart Slicer, then try again.")
        if install_torch(plan.torch) is None:
            raise DependencyError("PyTorch was not installed (cancelled or failed); see the Python console.")
    if plan.pip:
        pip_install(list(plan.pip))

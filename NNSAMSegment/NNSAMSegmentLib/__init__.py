"""Logic of the NNSAMSegment Slicer extension that does not need Qt.

Every class here takes its collaborators (MRML scene, process runner, settings store, installers) through its
constructor, so the whole package can be tested with plain pytest against the MRML libraries of ``slicer-core``.
Nothing in this package imports ``qt``, ``ctk`` or ``slicer.util`` at import time; the few Slicer-only code
paths (QProcess runner, QSettings store, pip installation) import them lazily.

Modules:

- :mod:`.Errors`: the one-line :class:`UserError` shown in the panel.
- :mod:`.Signal`: a minimal signal/slot helper (PythonQt cannot define new Qt signals from Python).
- :mod:`.SharedResources`: finds the resources shared by the module and the Segment Editor effect.
- :mod:`.Terminology`: the cardiac classes (SNOMED CT codes, colours) and segment creation.
- :mod:`.ImageGeometry`: volume node <-> image (numpy KJI array + LPS geometry) <-> file.
- :mod:`.Annotations`: annotated-slice detection and the training label map.
- :mod:`.ResultImport`: importing a predicted label map (fill only unannotated slices, or a new node).
- :mod:`.Progress`: parsing ``--progress json`` lines, time-left estimates.
- :mod:`.EngineCommands`: command lines of the ``nnsam_core.cli`` engine.
- :mod:`.ProcessRunner`: process abstraction (subprocess-based, QProcess-based).
- :mod:`.EngineJob`: one engine run with its temporary folder, progress, stop and clean-up.
- :mod:`.Bundles`: model bundles (folders with ``nnsam.json``) and the local bundle store.
- :mod:`.FineTuneResume`: a stopped fine-tune's kept job folder, described so it can be resumed.
- :mod:`.Settings`: remembered choices (last bundle, encoder, preset, device, resumable fine-tune).
- :mod:`.Devices`: which compute devices are available.
- :mod:`.Weights`: the weights manifest and ``weights status`` output.
- :mod:`.InstallLogic`: dependency check and installation (Slicer's SimpleITK and torch are never replaced).
- :mod:`.Workflow`: the fine-tune / segment workflow used by the module panel, the effect and the self-test.
"""

"""The cardiac classes: names, SNOMED CT codes, recommended colours, and segments created from them.

The codes and colours come from the shared terminology file (Slicer's ``.term.json`` format, so Slicer's
Terminologies module can load it too); each type there carries an ``nnsamClassName`` (LV, RV, LA, RA, Myo).
LV, RV, LA and RA carry the codes of Slicer's DICOM master list (code, context group and UMLS concept as there);
Myocardium (not in that list) uses the SNOMED CT code SlicerTotalSegmentator uses. The colours are not the master
list's: its LA, RA and Heart colours are nearly the same brown, so five clearly different hues are used instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Optional

from .SharedResources import TERMINOLOGY_FILE, sharedResourcePath

REGION_CONTEXT_NAME = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class Code:
    scheme: str
    value: str
    meaning: str

    def serialized(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"


@dataclass(frozen=True)
class CardiacClass:
    name: str  # short class name used in bundles and segment names: LV, RV, LA, RA, Myo
    type: Code
    color255: tuple

    @property
    def color(self) -> tuple:
        """Colour as Slicer segments store it (0..1 floats)."""
        return tuple(c / 255.0 for c in self.color255)


class CardiacTerminology:
    def __init__(self, path: Optional[str] = None):
        self.path = path or sharedResourcePath(TERMINOLOGY_FILE)
        with open(self.path, encoding="utf-8") as handle:
            data = json.load(handle)
        self.contextName = data["SegmentationCategoryTypeContextName"]
        category = data["SegmentationCodes"]["Category"][0]
        self.category = Code(category["CodingSchemeDesignator"], category["CodeValue"], category["CodeMeaning"])
        self.classes = [
            CardiacClass(name=entry["nnsamClassName"],
                         type=Code(entry["CodingSchemeDesignator"], entry["CodeValue"], entry["CodeMeaning"]),
                         color255=tuple(int(c) for c in entry["recommendedDisplayRGBValue"]))
            for entry in category["Type"]
        ]

    @property
    def classNames(self) -> list[str]:
        return [c.name for c in self.classes]

    def find(self, name: str) -> Optional[CardiacClass]:
        """The class for a segment name: the short name or the code meaning, ignoring case and spaces."""
        key = "".join(str(name).split()).lower()
        for cardiacClass in self.classes:
            if key in ("".join(cardiacClass.name.split()).lower(), "".join(cardiacClass.type.meaning.split()).lower()):
                return cardiacClass
        return None

    def entryString(self, cardiacClass: CardiacClass) -> str:
        """Terminology entry in Slicer's serialized format (what ``vtkSegment.SetTerminology`` takes)."""
        empty = "^^"
        return "~".join([self.contextName, self.category.serialized(), cardiacClass.type.serialized(), empty,
                         REGION_CONTEXT_NAME, empty, empty])


def ensureSegment(segmentation, name: str, terminology: Optional[CardiacTerminology] = None,
                  color: Optional[tuple] = None) -> str:
    """ID of the segment called ``name`` in a ``vtkSegmentation``, created (empty) if missing.

    A new segment of a cardiac class gets the standard terminology and colour; an existing segment is left as the
    user made it.
    """
    segmentId = segmentation.GetSegmentIdBySegmentName(name)
    if segmentId:
        return segmentId
    cardiacClass = terminology.find(name) if terminology is not None else None
    if color is None and cardiacClass is not None:
        color = cardiacClass.color
    if color is not None:
        segmentId = segmentation.AddEmptySegment("", name, [float(c) for c in color])
    else:
        segmentId = segmentation.AddEmptySegment("", name)  # Slicer picks a colour
    if cardiacClass is not None:
        segmentation.GetSegment(segmentId).SetTerminology(terminology.entryString(cardiacClass))
    return segmentId


def ensureCardiacSegments(segmentation, terminology: CardiacTerminology) -> list[str]:
    """Create whichever of LV, RV, LA, RA, Myo are missing; return the IDs of all five, in that order."""
    return [ensureSegment(segmentation, cardiacClass.name, terminology) for cardiacClass in terminology.classes]


def loadTerminologyIntoSlicer(terminologiesLogic, path: str) -> bool:
    """Load the terminology file into Slicer's Terminologies logic; False (with a warning) if Slicer refused it.

    ``LoadTerminologyFromFile`` reports failure only by returning an empty context name.
    """
    contextName = terminologiesLogic.LoadTerminologyFromFile(path)
    if not contextName:
        logging.warning(f"NNSAMSegment: Slicer could not load the cardiac terminology {path}; the cardiac codes are "
                        "not offered in Slicer's terminology dialogs.")
        return False
    return True

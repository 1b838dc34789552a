"""The nnSAM Segment Editor effect (loaded by Slicer from SegmentEditorEffect.py; see SegmentEditorNNSAM.py)."""

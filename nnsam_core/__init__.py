"""nnsam_core: nnSAM (a frozen SAM image encoder plugged into nnU-Net v2) for few-shot segmentation.

Python API::

    from nnsam_core import fine_tune, Bundle, segment
    bundle = fine_tune("ct.nrrd", "labels.seg.nrrd", output="heart_model", slices=[40, 60, 80, 100])
    labels = segment(Bundle.load("heart_model"), "next_patient.nrrd")   # a SimpleITK image
"""

__version__ = "0.1.0"

from .errors import NNSAMError  # noqa: E402


def __getattr__(name):
    # Heavy imports (torch, nnunetv2) only when the API is used, so `nnsam --help` stays fast.
    if name == "fine_tune":
        from .finetune import fine_tune
        return fine_tune
    if name in ("segment", "Segmenter", "write_image_atomically"):
        from . import predict
        return getattr(predict, name)
    if name == "Bundle":
        from .bundle import Bundle
        return Bundle
    if name == "NNSAMConfig":
        from .config import NNSAMConfig
        return NNSAMConfig
    raise AttributeError(name)


__all__ = ["NNSAMError", "NNSAMConfig", "fine_tune", "segment", "Segmenter", "Bundle", "__version__"]

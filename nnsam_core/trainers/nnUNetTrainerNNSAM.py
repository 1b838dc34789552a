"""nnSAM trainers for nnU-Net's own command line (the "plug-and-play" route):

    export nnUNet_extTrainer=$(python -c "import nnsam_core, os; print(os.path.dirname(nnsam_core.__file__))")/trainers
    nnUNetv2_train DATASET 2d FOLD -tr nnUNetTrainerNNSAM

nnU-Net imports this file as a top-level module; the classes themselves live in ``nnsam_core.training``.
"""

from nnsam_core.training.fewshot import nnUNetTrainerFewShot  # noqa: F401  (re-exported for nnU-Net's lookup)
from nnsam_core.training.nnsam import nnUNetTrainerNNSAM  # noqa: F401
from nnsam_core.training.variants import (  # noqa: F401
    nnUNetTrainerNNSAM_debug,
    nnUNetTrainerNNSAM_1epoch,
    nnUNetTrainerNNSAM_10epochs,
    nnUNetTrainerNNSAM_50epochs,
    nnUNetTrainerNNSAM_250epochs,
    nnUNetTrainerNNSAM_full,
    nnUNetTrainerNNSAM_MobileSAM,
    nnUNetTrainerNNSAMCached,
    nnUNetTrainerNNSAMRandom,
    nnUNetTrainerNNSAMRandom_MobileSAM,
    nnUNetTrainerNNSAMRecomputed,
)

"""The training methods and SAM-branch options the engine offers (light: the command line reads this without
importing torch)."""

METHODS = ("nnsam", "nnunet", "nnsam-random", "nnsam-recomputed")
# The SAM encoders (encoders.ENCODERS has their specs), as the commands offer them; the first is the default.
ENCODER_NAMES = ("litemedsam", "mobilesam")

# What the frozen encoder is fed (encoders.input_preparation) and where its embedding may be injected
# (in-plane downsampling of the U-Net skip).
SAM_INPUTS = ("nnunet", "unit-range")
INJECT_STRIDES = (2, 4, 8, 16, 32)
# Embeddings of augmented copies per training slice (NNSAMConfig.embedding_variants, .embedding_views) at most.
MAX_EMBEDDING_VARIANTS = 64
# Share of the training steps that run the encoder on the augmented patches (NNSAMConfig.recompute_share) unless
# told otherwise. The cache alone fell about 4.5 Dice points below recomputing every step on CHD at 192x192; a tenth
# share reached recomputing's level over three seeds, for 1-3% more time per 512x512 training step on a CPU and a
# third more at 192x192 (docs/benchmarks/chd_recompute_share10_cpu192_q1000, docs/speed/cpu.md). Until 2026-11-28
# the default was 0 (the cache at every step).
DEFAULT_RECOMPUTE_SHARE = 0.1
# What a record written before the share was recorded, or while it defaulted to 0, trained with.
LEGACY_RECOMPUTE_SHARE = 0.0


def check_embedding_variants(count: int, option: str = "--embedding-variants") -> None:
    """The one-line error for an --embedding-variants (or --embedding-views) the engine cannot honour."""
    if not 0 <= count <= MAX_EMBEDDING_VARIANTS:
        from .errors import NNSAMError
        raise NNSAMError(f"{option} must be 0 to {MAX_EMBEDDING_VARIANTS}, not {count}")


def check_recompute_share(share: float) -> None:
    """The one-line error for a --recompute-share outside 0 to 1."""
    if not 0.0 <= share <= 1.0:  # also false for nan
        from .errors import NNSAMError
        raise NNSAMError(f"--recompute-share must be 0 to 1 (a share of the training steps), not {share:g}")


METHOD_HELP = ("nnsam; nnunet (no SAM branch, same pipeline); nnsam-random (random frozen encoder, the control for "
               "pretrained features); nnsam-recomputed (embeddings recomputed on every patch at every training "
               "step, as the authors' code does: the embedding cache's accuracy reference; slow)")

"""The training methods the engine offers (light: the command line reads this without importing torch)."""

METHODS = ("nnsam", "nnunet", "nnsam-random", "nnsam-recomputed")

METHOD_HELP = ("nnsam; nnunet (no SAM branch, same pipeline); nnsam-random (random frozen encoder, the control for "
               "pretrained features); nnsam-recomputed (embeddings recomputed on every patch at every training "
               "step, as the authors' code does: the embedding cache's accuracy reference; slow)")

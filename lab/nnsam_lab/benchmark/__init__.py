"""``nnsam-lab benchmark``: nnSAM against nnU-Net (and a random-encoder control) on few annotated slices.

- :mod:`.splits`: fixed, nested, patient- or slice-level splits (pure functions);
- :mod:`.data`: a raw nnU-Net dataset read as labelled slices, training subsets written as raw datasets;
- :mod:`.runner`: the two protocols (labelled slices as in the paper's Table 1; in-volume, the clinician's
  workflow), resumable run by run;
- :mod:`.report`: markdown tables, CSV, curves and example figures;
- :mod:`.command`: the ``nnsam-lab benchmark`` verb.
"""

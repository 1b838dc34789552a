"""``nnsam-lab benchmark``: nnSAM against nnU-Net (and a random-encoder control) on few annotated slices.

- :mod:`.splits`: fixed, nested, patient- or slice-level splits (pure functions);
- :mod:`.data`: a raw nnU-Net dataset read as labelled slices (or one-slice cases as one sparse volume per
  patient), training subsets written as raw datasets;
- :mod:`.fill`: the clinician's baseline, fill between slices (ITK's morphological contour interpolation, run in
  the worker process of :mod:`.itk_worker`);
- :mod:`.runner`: the two protocols (labelled slices as in the paper's Table 1; in-volume, the clinician's
  workflow), resumable run by run;
- :mod:`.report`: markdown tables, CSV, curves and example figures (in-volume: 3D Dice per structure first);
- :mod:`.command`: the ``nnsam-lab benchmark`` verb.
"""

"""The NNSAMSegment lab: research tools that measure the engine, never part of what a user runs.

- :mod:`.benchmark`: nnSAM against nnU-Net (and controls) on few annotated slices, resumable, with reports;
- :mod:`.speed`: what nnSAM costs over nnU-Net, measured in one run on one machine;
- :mod:`.probe`: a linear probe of frozen encoder embeddings;
- :mod:`.rawdata`: one scan and its segmentation written as a one-case nnU-Net raw dataset.

The lab depends one way on the engine's public modules (``nnsam_core``); the engine never imports the lab.
Command line: ``nnsam-lab benchmark``, ``nnsam-lab bench-speed``, ``nnsam-lab probe``, and
``nnsam-lab raw-dataset`` (a scan and its segmentation as a one-case nnU-Net raw dataset, for the benchmark).
"""

"""The fused nnSAM model: nnU-Net's PlainConvUNet plus a frozen SAM embedding concatenated at one skip.

- :mod:`.grid`: the grid channels that tell the network where a patch comes from;
- :mod:`.bank`: the embedding bank (each slice's embedding computed once by the frozen encoder);
- :mod:`.decoder`: nnU-Net's decoder with one stage that also takes the SAM features;
- :mod:`.network`: the network and its builder from nnU-Net's plans.
"""

"""nnU-Net trainers for nnSAM, in the style of nnunetv2's trainer variants.

- :mod:`.datasets`: nnU-Net's datasets with the grid channels appended;
- :mod:`.transforms`: keeps nnU-Net's intensity augmentations off the grid channels;
- :mod:`.fewshot`: :class:`nnUNetTrainerFewShot`, stock nnU-Net with a short schedule and progress (the ``nnunet``
  method, through the very same pipeline);
- :mod:`.nnsam`: :class:`nnUNetTrainerNNSAM`, the same plus the frozen SAM branch;
- :mod:`.variants`: encoder, control and schedule variants for ``nnUNetv2_train -tr NAME``;
- :mod:`.registry`: the classes by name, checked against the light catalogue in ``nnsam_core.methods``.

The classes live in importable modules so that nnU-Net's augmentation worker processes can unpickle the dataset
classes; ``nnsam_core/trainers/`` re-exports them for ``nnUNet_extTrainer``.
"""

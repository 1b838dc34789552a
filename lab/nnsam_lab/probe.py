"""Linear probe of frozen encoder embeddings: how much of the classes can a 1x1 linear layer read from them?

A diagnostic for the benchmark (issue: "if nnSAM does not win, find out why"). It isolates the encoder and its
input preparation from nnU-Net: for each variant (encoder weights x SAM input preparation) it embeds the
benchmark's training-pool slices, fits a per-pixel linear classifier (1x1 convolution, class-balanced cross
entropy) on the first ``--fit`` slices of the pool and reports Dice on the next ``--validate`` pool slices, at
the embedding's 64x64 grid. Test slices of the benchmark split are never read.

    nnsam-lab probe ../shared/data/Dataset901_CHD --downsample 4 --json probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from nnsam_core.encoders import load_encoder
from nnsam_core.methods import SAM_INPUTS
from .benchmark.data import downsample, read_dataset
from .benchmark.splits import default_split_mode, make_split

VARIANTS = (("litemedsam", True), ("litemedsam", False))


def _foreground_properties(images: Sequence[np.ndarray], labels: Sequence[np.ndarray]) -> dict:
    """What nnU-Net's fingerprint records for CT normalisation: statistics of the labelled voxels."""
    voxels = np.concatenate([img[lab > 0] for img, lab in zip(images, labels)]).astype(np.float64)
    return {"mean": float(voxels.mean()), "std": float(voxels.std()),
            "percentile_00_5": float(np.percentile(voxels, 0.5)), "percentile_99_5": float(np.percentile(voxels, 99.5))}


def _normalise(images: list[np.ndarray], scheme: str, properties: dict) -> list[np.ndarray]:
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import (CTNormalization,
                                                                                    ZScoreNormalization)
    if scheme == "CT":
        normaliser = CTNormalization(use_mask_for_norm=False, intensityproperties=properties)
    else:  # nnU-Net's default for every other modality: z-score per image (per slice, as fine_tune trains)
        normaliser = ZScoreNormalization(use_mask_for_norm=False, intensityproperties=properties)
    return [normaliser.run(img.astype(np.float32).copy()) for img in images]


def _embed(encoder, slices: list[np.ndarray], preparation: str) -> torch.Tensor:
    out = []
    for img in slices:
        out.append(encoder(torch.from_numpy(img)[None, None], preparation=preparation))
    return torch.cat(out)  # (N, C, 64, 64)


def _labels_on_grid(labels: list[np.ndarray], grid: int) -> torch.Tensor:
    stacked = torch.from_numpy(np.stack(labels).astype(np.float32))[:, None]
    return F.interpolate(stacked, size=(grid, grid), mode="nearest")[:, 0].long()


def fit_and_score(features_fit: torch.Tensor, labels_fit: torch.Tensor, features_val: torch.Tensor,
                  labels_val: torch.Tensor, n_classes: int, steps: int = 300, seed: int = 0) -> dict:
    """Per-pixel linear classifier on standardised features; Dice (%) per foreground class on the validation set
    (summed over its slices)."""
    mean = features_fit.mean(dim=(0, 2, 3), keepdim=True)
    std = features_fit.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    x_fit, x_val = (features_fit - mean) / std, (features_val - mean) / std
    counts = torch.bincount(labels_fit.flatten(), minlength=n_classes).float()
    weights = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp_min(1)), torch.zeros_like(counts))
    torch.manual_seed(seed)
    probe = torch.nn.Conv2d(x_fit.shape[1], n_classes, 1)
    optimiser = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = F.cross_entropy(probe(x_fit), labels_fit, weight=weights)
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        predicted = probe(x_val).argmax(1)
    dice = {}
    for c in range(1, n_classes):
        p, g = predicted == c, labels_val == c
        denominator = int(p.sum() + g.sum())
        dice[c] = 100.0 * 2 * int((p & g).sum()) / denominator if denominator else None
    return {"dice": dice, "final_train_loss": float(loss.detach())}


def run_probe(dataset, downsample_factor: int, n_fit: int, n_validate: int, classes: Sequence[str],
              preparations: Sequence[str]) -> dict:
    info = read_dataset(dataset)
    units = info.units()
    split = make_split(units, default_split_mode(units), max_size=n_fit + n_validate)
    chosen = list(split.pool[:n_fit + n_validate])
    images, labels = [], []
    for unit in chosen:
        image = sitk.ReadImage(str(info.image_path(unit.case)))
        label = sitk.ReadImage(str(info.label_path(unit.case)))
        if unit.k is not None:
            image, label = image[:, :, unit.k:unit.k + 1], label[:, :, unit.k:unit.k + 1]
        image, label = downsample(image, label, downsample_factor)
        images.append(sitk.GetArrayFromImage(image).astype(np.float32).reshape(image.GetSize()[1], image.GetSize()[0]))
        labels.append(sitk.GetArrayFromImage(label).reshape(image.GetSize()[1], image.GetSize()[0]))
    scheme = "CT" if info.channel_name.upper() == "CT" else "zscore"
    properties = _foreground_properties(images[:n_fit], labels[:n_fit])  # from the fitting slices only
    normalised = _normalise(images, scheme, properties)
    n_classes = len(info.class_names) + 1
    headline = [info.class_names.index(c) + 1 for c in classes] if classes else list(range(1, n_classes))

    results = []
    for name, pretrained in VARIANTS:
        encoder = load_encoder(name, pretrained=pretrained, seed=0)
        for preparation in preparations:
            started = time.perf_counter()
            features = _embed(encoder, normalised, preparation)
            grid_labels = _labels_on_grid(labels, features.shape[-1])
            scores = fit_and_score(features[:n_fit], grid_labels[:n_fit], features[n_fit:], grid_labels[n_fit:],
                                   n_classes)
            per_class = {info.class_names[c - 1]: scores["dice"][c] for c in range(1, n_classes)}
            values = [scores["dice"][c] for c in headline if scores["dice"][c] is not None]
            results.append({"encoder": name, "pretrained": pretrained, "preparation": preparation,
                            "mean_dice": float(np.mean(values)) if values else None, "dice": per_class,
                            "final_train_loss": scores["final_train_loss"],
                            "seconds": round(time.perf_counter() - started, 1)})
            print(_row(results[-1], classes or info.class_names), flush=True)
    return {"dataset": str(dataset), "split": split.mode, "downsample": downsample_factor,
            "fit": [u.name for u in chosen[:n_fit]], "validate": [u.name for u in chosen[n_fit:]],
            "normalisation": scheme, "headline_classes": [info.class_names[c - 1] for c in headline],
            "results": results}


def _row(r: dict, classes: Sequence[str]) -> str:
    weights = "pretrained" if r["pretrained"] else "random"
    cells = " | ".join("-" if r["dice"][c] is None else f"{r['dice'][c]:.1f}" for c in classes)
    mean = "-" if r["mean_dice"] is None else f"{r['mean_dice']:.1f}"
    return f"| {r['encoder']} {weights} | {r['preparation']} | {mean} | {cells} |"


def add_probe_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("probe", help="linear probe of frozen encoder embeddings",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--downsample", type=int, default=1)
    parser.add_argument("--fit", type=int, default=8, help="pool slices to fit the probe on (default 8)")
    parser.add_argument("--validate", type=int, default=16, help="next pool slices to score it on (default 16)")
    parser.add_argument("--classes", nargs="+", default=None, help="classes of the mean (default: all)")
    parser.add_argument("--preparations", nargs="+", default=list(SAM_INPUTS), choices=SAM_INPUTS)
    parser.add_argument("--json", help="write the results here too")
    parser.set_defaults(func=run_probe_command)
    return parser


def run_probe_command(args) -> int:
    classes = args.classes
    print(f"| encoder | SAM input | mean Dice | {' | '.join(classes) if classes else 'per class'} |", flush=True)
    result = run_probe(args.dataset, args.downsample, args.fit, args.validate, classes or [], args.preparations)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0

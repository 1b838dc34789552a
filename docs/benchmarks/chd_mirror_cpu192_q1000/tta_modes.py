"""Score kept benchmark models (``nnsam benchmark ... --keep-models``) under three treatments of the mirrored
passes of test-time mirroring:

  flipped   what nnsam does: a mirrored pass samples the slice's embedding, mirrored (1 encoder call per slice)
  true      a mirrored pass samples the embedding of the mirrored slice, as in training with --mirror-embeddings
            (4 encoder calls per slice)
  nomirror  no test-time mirroring (nnsam predict --no-mirroring)

    python tta_modes.py REPORT_DIR RUN_DIR [RUN_DIR ...]      # RUN_DIR: REPORT_DIR/runs/<method>/n04_seed0

Prints each mode's mean Dice over LV, RV, LA, RA, Myo (per slice first, as the benchmark report) and the score
the benchmark stored (which "flipped" must reproduce), and writes RUN_DIR/tta_modes.json with per-slice values."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from nnsam_core.benchmark.runner import _score
from nnsam_core.bundle import Bundle
from nnsam_core.network import NNSAMNet
from nnsam_core.predict import Segmenter

HEADLINE = range(1, 6)  # LV, RV, LA, RA, Myo in Dataset901_CHD
mode = {"value": "flipped"}
product_sam_features = NNSAMNet.sam_features


def sam_features(self, grid, size):
    if self.training or mode["value"] != "true":
        return product_sam_features(self, grid, size)
    grid = grid.float()
    keys = torch.round(grid[:, 2].flatten(1).amax(dim=1)).long().tolist()
    inside, rc = self._slice_coverage(grid, size)
    mirrors = self._patch_mirrors(inside, rc)
    self.sam_bank.warm_mirrored([k for k, m in zip(keys, mirrors) if k > 0 and any(m)])
    embeddings = self.sam_bank.get(keys, grid.device, mirrors=mirrors)
    normalised = torch.where(inside, 2.0 * (rc - 1.0) - 1.0, torch.full_like(rc, -2.0))
    signs = torch.tensor([[-1.0 if m else 1.0 for m in pair] for pair in mirrors], device=rc.device)
    sampled = F.grid_sample(embeddings, (normalised * signs[:, :, None, None]).flip(1).permute(0, 2, 3, 1),
                            mode="bilinear", padding_mode="zeros", align_corners=False)
    return self._standardise(sampled) * inside


NNSAMNet.sam_features = sam_features


def nanmean(values) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def main() -> None:
    report = Path(sys.argv[1])
    for run in map(Path, sys.argv[2:]):
        metrics = json.loads((run / "metrics.json").read_text())
        bundle = Bundle.load(run / "model")
        results = {}
        for name in ("flipped", "true", "nomirror"):
            mode["value"] = name
            segmenter = Segmenter(bundle, "cpu", use_mirroring=name != "nomirror")
            per_slice = []
            for unit in metrics["test_units"]:
                image = sitk.ReadImage(str(report / "data" / "imagesTr" / f"{unit}_0000.nii.gz"))
                truth = sitk.ReadImage(str(report / "data" / "labelsTr" / f"{unit}.nii.gz"))
                for score in _score(segmenter.segment(image), truth, list(range(1, 8))):
                    per_slice.append(nanmean([score["classes"][str(v)]["dice"] for v in HEADLINE]))
            results[name] = per_slice
            print(f"{run} {name:8s} {nanmean(per_slice):6.2f}  encoder calls {segmenter.encoder_calls}", flush=True)
        stored = [nanmean([s["classes"][str(v)]["dice"] for v in HEADLINE]) for s in metrics["scores"]]
        print(f"{run} {'stored':8s} {nanmean(stored):6.2f}", flush=True)
        (run / "tta_modes.json").write_text(json.dumps({"run": str(run), "stored": stored, **results}))


if __name__ == "__main__":
    main()

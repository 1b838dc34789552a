"""How far the cache's features are from recomputing's, on the patches nnU-Net's training pipeline really makes.

Trains nnsam-recomputed for a few iterations; at every training step it also computes what the plain cache would
have fed the decoder for the same patches, and prints per patch: cosine similarity and relative L2 distance of
the two (standardised features at the injection resolution, over the pixels of the slice), plus the per-element
RMS of the difference (the noise level a cached run would need to see features as far from clean as recomputing
does).

    python feature_gap.py RAW_DATASET OUT_BUNDLE ITERATIONS     # RAW_DATASET: an nnU-Net raw dataset"""
import json, statistics, sys
import torch
from nnsam_core import finetune
from nnsam_core.network import NNSAMNet, GRID_CHANNELS

records = []
original_forward = NNSAMNet.forward


def forward(self, x):
    if self.training and self.config_dict.get("embeddings") == "recomputed":
        image, grid = x[:, :-GRID_CHANNELS], x[:, -GRID_CHANNELS:]
        skips = self.encoder(image)
        size = skips[self.inject_skip].shape[2:]
        rec = self.recomputed_sam_features(image, grid, size)
        with torch.no_grad():
            cache = self.sam_features(grid, size)
            inside = (cache.abs().sum(1, keepdim=True) > 0) | (rec.abs().sum(1, keepdim=True) > 0)
            for b in range(x.shape[0]):
                m = inside[b, 0]
                r, c = rec[b][:, m], cache[b][:, m]
                records.append({"cos": float((r * c).sum() / (r.norm() * c.norm()).clamp_min(1e-8)),
                                "rel_l2": float((r - c).norm() / c.norm().clamp_min(1e-8)),
                                "rms_diff": float((r - c).pow(2).mean().sqrt()),
                                "rms_cache": float(c.pow(2).mean().sqrt()),
                                "inside": float(m.float().mean())})
        return self.decoder(skips, rec)
    return original_forward(self, x)


if __name__ == "__main__":
    raw, out, iterations = sys.argv[1], sys.argv[2], int(sys.argv[3])
    NNSAMNet.forward = forward
    finetune.fine_tune(dataset_dir=raw, output=out, method="nnsam-recomputed", iterations=iterations, device="cpu",
                       seed=0)
    keys = ["cos", "rel_l2", "rms_diff", "rms_cache", "inside"]
    for k in keys:
        values = [r[k] for r in records]
        print(f"{k}: mean {statistics.mean(values):.3f} sd {statistics.stdev(values):.3f} "
              f"min {min(values):.3f} max {max(values):.3f} (n={len(values)})")
    json.dump(records, open(out + ".records.json", "w"))

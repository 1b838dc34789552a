"""Is the frozen encoder's embedding of a transformed slice the transformed embedding of the slice? Per transform
of nnU-Net's 2D augmentation, the cosine similarity (over channels and pixels, inside the slice) between
encoder(T(slice)) and T(encoder(slice)), for the 4 training slices at the CPU working resolution (192x192).
Spatial T is applied to the embedding with the same normalised affine; intensity T leaves positions alone.

    python equivariance.py RAW_DATASET [random]       # RAW_DATASET/imagesTr/*.nii.gz: the slices"""
import glob, math, sys
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from nnsam_core.encoders import load_encoder


def affine(image, angle=0.0, scale=1.0, flip_x=False, flip_y=False):
    c, s = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[c * (-1 if flip_x else 1), -s, 0.0], [s, c * (-1 if flip_y else 1), 0.0]])[None]
    grid = F.affine_grid(theta.expand(image.shape[0], -1, -1), list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cos(a, b, mask):
    a, b = a[0][:, mask], b[0][:, mask]
    return float((a * b).sum() / (a.norm() * b.norm()))


if __name__ == "__main__":
    raw = sys.argv[1]
    pretrained = sys.argv[2:] != ["random"]
    encoder = load_encoder("litemedsam", pretrained=pretrained, preparation="unit-range")
    torch.manual_seed(0)
    transforms = {
        "identity": dict(spatial={}),
        "mirror x": dict(spatial={"flip_x": True}), "mirror y": dict(spatial={"flip_y": True}),
        "rotate 15 deg": dict(spatial={"angle": math.radians(15)}),
        "rotate 90 deg": dict(spatial={"angle": math.radians(90)}),
        "scale 0.8": dict(spatial={"scale": 0.8}), "scale 1.25": dict(spatial={"scale": 1.25}),
        "noise var 0.1": dict(intensity=lambda x: x + 0.1 ** 0.5 * torch.randn_like(x)),
        "gamma 0.7": dict(intensity=lambda x: ((x - x.min()) / (x.max() - x.min())) ** 0.7 * (x.max() - x.min())
                          + x.min()),
        "contrast 1.25": dict(intensity=lambda x: (x - x.mean()) * 1.25 + x.mean()),
        "blur 3x3 mean": dict(intensity=lambda x: F.avg_pool2d(x, 3, 1, 1)),
        "low-res 0.5": dict(intensity=lambda x: F.interpolate(F.interpolate(x, scale_factor=0.5, mode="nearest"),
                                                              size=x.shape[2:], mode="bilinear")),
    }
    files = sorted(glob.glob(f"{raw}/imagesTr/*.nii.gz"))
    slices = []
    for f in files:
        x = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(f)).astype("float32"))[None, None, 0]
        x = F.interpolate(x, size=(192, 192), mode="area")
        slices.append((x - x.mean()) / x.std())  # z-scored like nnU-Net (unit-range rescales per slice anyway)
    cleans = [encoder(x) for x in slices]
    # standardised per channel with the clean embeddings' statistics, as the network does (embedding_norm)
    stacked = torch.cat(cleans)
    mean, std = stacked.mean(dim=(0, 2, 3), keepdim=True), stacked.std(dim=(0, 2, 3), keepdim=True)

    def standardise(embedding):
        return (embedding - mean) / std

    results = {name: [] for name in transforms}
    for x, clean in zip(slices, cleans):
        for name, t in transforms.items():
            if "spatial" in t:
                xt = affine(x, **t["spatial"])
                ones = affine(torch.ones_like(clean[:, :1]), **t["spatial"])[0, 0] > 0.99
                expected = affine(clean, **t["spatial"])
            else:
                xt, expected = t["intensity"](x), clean
                ones = torch.ones(clean.shape[2:], dtype=torch.bool)
            results[name].append(cos(standardise(encoder(xt)), standardise(expected), ones))
    print(f"encoder litemedsam {'pretrained' if pretrained else 'random'}; "
          f"cosine of standardised encoder(T(x)) vs T(encoder(x)), {len(files)} slices")
    for name, values in results.items():
        print(f"{name:>15}: " + " ".join(f"{v:.3f}" for v in values) + f"   mean {sum(values) / len(values):.3f}")

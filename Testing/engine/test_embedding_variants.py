"""Embedding variants (the cache's embeddings of intensity-augmented copies of each training slice, made once with
nnU-Net's own intensity augmentations) and mirror embeddings (mirrored patches sample the mirrored slice's
embedding): both made before training, used in training only. Also how the cache's options, partial recomputing
included, reach `nnsam train` and `nnsam benchmark`."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnsam_core.network import EmbeddingBank, NNSAMConfig


def _mean_encoder(slices: torch.Tensor) -> torch.Tensor:
    """An embedding that follows its input, so a variant is told apart from the clean slice."""
    return slices.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 256, 64, 64).clone()


def _bank() -> EmbeddingBank:
    slices = {1: np.full((32, 32), 1.0, np.float32), 2: np.full((32, 32), 2.0, np.float32)}
    return EmbeddingBank(_mean_encoder, lambda keys: [slices[k] for k in keys], batch_size=2)


def test_variants_are_encoded_once_and_drawn_only_when_asked():
    bank = _bank()
    bank.warm([1, 2])
    assert bank.encoder_calls == 2
    shifts = iter(range(10, 100, 10))
    bank.warm_variants([1, 2, 1], 3, lambda image: image + next(shifts))   # a repeated key is embedded once
    assert bank.encoder_calls == 2 + 2 * 3 and bank.variant_count(1) == 3 and bank.variant_count(2) == 3
    bank.warm_variants([1, 2], 3, lambda image: image)
    assert bank.encoder_calls == 8                                        # already held: no encoder call

    clean = {float(bank.get([k], torch.device("cpu"))[0, 0, 0, 0]) for k in (1, 2) for _ in range(20)}
    assert clean == {1.0, 2.0}                                            # not asked: always the clean slice
    torch.manual_seed(0)
    drawn = {float(bank.get([1], torch.device("cpu"), draw_variant=True)[0, 0, 0, 0]) for _ in range(200)}
    assert drawn == {1.0, 11.0, 21.0, 31.0}                               # the clean one and its three variants

    bank.drop([1])
    assert bank.variant_count(1) == 0 and bank.variant_count(2) == 3


def test_variant_count_is_validated_and_old_configs_have_none():
    with pytest.raises(ValueError, match="embedding_variants"):
        NNSAMConfig(embedding_variants=-1)
    with pytest.raises(ValueError, match="embedding_variants"):
        NNSAMConfig(embedding_variants=65)
    old = NNSAMConfig().as_dict()
    old.pop("embedding_variants")
    assert NNSAMConfig.from_dict(old).embedding_variants == 0


def test_variant_augmentations_are_nnunets_intensity_steps():
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform

    from nnsam_core.training import intensity_steps, nnUNetTrainerNNSAM

    pipeline = nnUNetTrainerNNSAM.get_training_transforms(
        (64, 64), (0.0, 0.0), None, (0, 1), False, use_mask_for_norm=[False], is_cascaded=False,
        foreground_labels=[1], regions=None, ignore_label=None)
    steps = intensity_steps(pipeline).transforms
    names = [type(getattr(step, "transform", step)).__name__ for step in steps]
    assert names == ["GaussianNoiseTransform", "GaussianBlurTransform", "MultiplicativeBrightnessTransform",
                     "ContrastTransform", "SimulateLowResolutionTransform", "GammaTransform", "GammaTransform"]
    assert not any(isinstance(getattr(s, "transform", s), (SpatialTransform, MirrorTransform)) for s in steps)

    augment = intensity_steps(pipeline)
    torch.manual_seed(0)
    np.random.seed(0)
    image = torch.linspace(-1, 1, 64 * 64).reshape(1, 64, 64)
    outputs = [augment(image=image.clone())["image"] for _ in range(20)]
    assert all(o.shape == image.shape for o in outputs)
    assert any(not torch.allclose(o, image) for o in outputs)   # most draws change the intensities


def test_fine_tune_with_variants_embeds_each_slice_k_times_and_draws_them_in_training(chest_ct, tmp_path,
                                                                                       monkeypatch):
    from conftest import CHEST_SLICES
    from nnsam_core import fine_tune
    from nnsam_core.predict import Segmenter

    made, asked, mirrored, views = [], [], [], []
    warm_variants, warm_mirrored, get = EmbeddingBank.warm_variants, EmbeddingBank.warm_mirrored, EmbeddingBank.get_mapped
    warm_views = EmbeddingBank.warm_views

    def recording_warm_variants(self, keys, count, augment):
        before = self.encoder_calls
        warm_variants(self, keys, count, augment)
        made.append((len(keys), count, self.encoder_calls - before))

    def recording_warm_mirrored(self, keys):
        before = self.encoder_calls
        warm_mirrored(self, keys)
        mirrored.append((len(keys), self.encoder_calls - before))

    def recording_warm_views(self, keys, count, rotation, scaling):
        before = self.encoder_calls
        warm_views(self, keys, count, rotation, scaling)
        views.append((len(keys), count, self.encoder_calls - before, rotation, scaling, self.variant_count(keys[0])))

    def recording_get(self, keys, device, draw_variant=False, mirrors=None):
        asked.append((draw_variant, mirrors))
        return get(self, keys, device, draw_variant, mirrors)

    monkeypatch.setattr(EmbeddingBank, "warm_variants", recording_warm_variants)
    monkeypatch.setattr(EmbeddingBank, "warm_mirrored", recording_warm_mirrored)
    monkeypatch.setattr(EmbeddingBank, "warm_views", recording_warm_views)
    monkeypatch.setattr(EmbeddingBank, "get_mapped", recording_get)
    bundle = fine_tune(*chest_ct, output=tmp_path / "model.nnsam", slices=CHEST_SLICES, iterations=2, device="cpu",
                       nnsam_config=NNSAMConfig(embedding_variants=2, mirror_embeddings=True, embedding_views=1))
    n_train = made[0][0]
    assert made == [(n_train, 2, 2 * n_train)] and 1 <= n_train <= len(CHEST_SLICES)
    # one view each, in nnU-Net's rotation (2D, square patch: a full turn) and scaling ranges, beside the variants
    assert views == [(n_train, 1, n_train, pytest.approx((-np.pi, np.pi)), (0.7, 1.4), 2 + 1)]
    assert mirrored == [(n_train, 3 * n_train)]                      # each slice's three mirror images, once
    training = [(draw, mirrors) for draw, mirrors in asked if draw]
    assert training                                                  # training draws among the variants
    assert any(any(any(pair) for pair in mirrors) for _, mirrors in training)  # and meets mirrored patches
    assert bundle.manifest["nnsam_config"]["embedding_variants"] == 2
    assert bundle.manifest["nnsam_config"]["mirror_embeddings"] is True
    assert bundle.manifest["nnsam_config"]["embedding_views"] == 1

    asked.clear()
    volume = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 300, size=(2, 48, 48)).astype(np.float32))
    labels = Segmenter(bundle, "cpu").segment(volume)
    assert labels.GetSize() == volume.GetSize()
    assert asked and not any(draw or mirrors for draw, mirrors in asked)  # inference: the clean slice only


@pytest.mark.parametrize("argv, expected", [
    ([], None),                                                        # the trainer's own configuration
    (["--embedding-variants", "3"], {"embedding_variants": 3, "embeddings": "cached"}),
    (["--method", "nnsam-recomputed"], {"embedding_variants": 0, "embeddings": "recomputed"}),
    (["--mirror-embeddings"], {"mirror_embeddings": True, "embeddings": "cached"}),
    (["--embedding-views", "4"], {"embedding_views": 4, "embedding_variants": 0, "embeddings": "cached"}),
    (["--recompute-share", "0.25"], {"recompute_share": 0.25, "embeddings": "cached"}),
    (["--recompute-share", "0.25", "--method", "nnsam-random"], {"recompute_share": 0.25, "pretrained": False}),
])
def test_train_command_passes_the_sam_branch_it_was_given(chest_ct, tmp_path, monkeypatch, argv, expected):
    import nnsam_core.finetune as finetune
    from nnsam_core.cli import main

    received = {}
    monkeypatch.setattr(finetune, "fine_tune", lambda *args, **kwargs: received.update(kwargs))
    assert main(["train", *chest_ct, "-o", str(tmp_path / "m"), "--progress", "none", *argv]) == 0
    from nnsam_core.training import config_of_trainer, trainer_for
    config = received["nnsam_config"]
    if expected is None:
        assert config is None
    else:  # what trains: the config given, else the method's trainer as it is
        effective = config or config_of_trainer(trainer_for(received["method"], received["encoder"]))
        assert {name: getattr(effective, name) for name in expected} == expected


@pytest.mark.parametrize("argv, message", [
    (["--embedding-variants", "65"], "--embedding-variants must be 0 to 64"),
    (["--embedding-variants", "2", "--method", "nnunet"], "applies to cached embeddings"),
    (["--embedding-variants", "2", "--method", "nnsam-recomputed"], "applies to cached embeddings"),
    (["--mirror-embeddings", "--method", "nnunet"], "--mirror-embeddings applies to cached embeddings"),
    (["--embedding-views", "65"], "--embedding-views must be 0 to 64"),
    (["--embedding-views", "2", "--method", "nnsam-recomputed"], "--embedding-views applies to cached embeddings"),
    (["--recompute-share", "1.5"], "--recompute-share must be 0 to 1"),
    (["--recompute-share", "nan"], "--recompute-share must be 0 to 1"),
    (["--recompute-share", "0.5", "--method", "nnsam-recomputed"], "--recompute-share applies to cached embeddings"),
    (["--recompute-share", "0.5", "--method", "nnunet"], "--recompute-share applies to cached embeddings"),
])
def test_train_command_refuses_variants_it_cannot_use(chest_ct, tmp_path, capsys, argv, message):
    from nnsam_core.cli import main

    assert main(["train", *chest_ct, "-o", str(tmp_path / "m"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("field, value, described", [
    ("embedding_variants", 8, "8 intensity-augmented embedding variants per training slice"),
    ("mirror_embeddings", True, "mirrored patches sample the mirrored slice's embedding"),
    ("recompute_share", 0.25, "embeddings recomputed at a share 0.25 of the training steps"),
])
def test_cache_options_are_settings_of_the_nnsam_methods_in_benchmarks(field, value, described):
    from nnsam_core.benchmark.report import _sam_branch
    from nnsam_core.benchmark.runner import Settings

    settings = Settings(protocol="slices", dataset="d")
    assert field not in settings.comparable()                  # folders written before the setting still match
    setattr(settings, field, value)
    assert settings.comparable()[field] == value
    assert getattr(settings.nnsam_config("nnsam"), field) == value
    assert settings.nnsam_config("nnunet") is None
    from nnsam_core.training import config_of_trainer, nnUNetTrainerNNSAMRecomputed
    recomputed = settings.nnsam_config("nnsam-recomputed") or config_of_trainer(nnUNetTrainerNNSAMRecomputed)
    runs = [{"method": "nnsam", "nnsam_config": settings.nnsam_config("nnsam").as_dict()},
            {"method": "nnsam-recomputed", "nnsam_config": recomputed.as_dict()}]
    assert described in _sam_branch(runs)
    assert described not in _sam_branch([{"method": "nnsam", "nnsam_config": NNSAMConfig().as_dict()}])
    assert described not in _sam_branch(runs[1:])             # recomputing every step has no cache to describe


def test_too_many_variant_embeddings_are_refused_before_any_is_made():
    from types import SimpleNamespace

    from nnsam_core.errors import NNSAMError
    from nnsam_core.training import MAX_VARIANT_EMBEDDINGS, nnUNetTrainerNNSAM

    bank = _bank()
    keys = list(range(1, MAX_VARIANT_EMBEDDINGS // 8 + 2))            # 8 variants each: just over the limit
    with pytest.raises(NNSAMError, match="use fewer or 0"):
        nnUNetTrainerNNSAM._warm_embedding_variants(SimpleNamespace(progress_callback=None), bank, keys, 8)
    assert bank.encoder_calls == 0 and bank.variant_count(1) == 0


class _PositionalEncoder:
    """Not mirror-equivariant, like SAM: the pooled slice plus a fixed ramp across the columns."""

    def __call__(self, slices: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(slices, (64, 64))
        ramp = torch.linspace(0, 5, 64).expand(64, 64)
        return (pooled + ramp).expand(-1, 256, -1, -1).clone()


@pytest.mark.parametrize("mirror_embeddings", [True, False])
def test_mirrored_patches_sample_the_mirrored_slice_embedding(trained, mirror_embeddings):
    from nnsam_core.network import build_nnsam_network, grid_channels
    from nnsam_core.predict import Segmenter

    bundle, _ = trained
    base = Segmenter(bundle, "cpu")
    net = build_nnsam_network(base.plans_manager, base.configuration_manager, 1, 8, False,
                              NNSAMConfig(embedding_norm="none", mirror_embeddings=mirror_embeddings))
    h, w = base.configuration_manager.patch_size
    slice_ = torch.from_numpy(np.random.default_rng(0).normal(size=(h, w)).astype(np.float32))
    encoder = _PositionalEncoder()
    bank = EmbeddingBank(encoder, lambda keys: [slice_.numpy() for _ in keys])
    bank.warm([1])
    if mirror_embeddings:
        bank.warm_mirrored([1])
        assert bank.encoder_calls == 1 + 3
    net.attach_bank(bank)
    net.train()
    grid = torch.from_numpy(grid_channels((1, h, w), [1])[:, 0])
    size = (h // 8, w // 8)
    upright = net.sam_features(grid[None], size)
    mirrored = net.sam_features(grid.flip(-1)[None], size)            # the patch mirrored across its columns
    resize = lambda e: torch.nn.functional.interpolate(e, size=size, mode="bilinear", align_corners=False)
    assert torch.allclose(upright, resize(encoder(slice_[None, None])), atol=2e-2)  # the bank keeps float16
    if mirror_embeddings:   # what recomputing gives: the embedding of the mirrored slice
        assert torch.allclose(mirrored, resize(encoder(slice_.flip(-1)[None, None])), atol=2e-2)
        other = torch.from_numpy(grid_channels((1, h, w), [2])[:, 0])    # a slice whose mirrors were not embedded
        assert torch.allclose(net.sam_features(other.flip(-1)[None], size),
                              net.sam_features(other[None], size).flip(-1), atol=2e-2)
    else:                   # the mirrored embedding of the slice
        assert torch.allclose(mirrored, upright.flip(-1), atol=2e-2)
    net.eval()                                                          # inference: never the mirrored slice's
    assert torch.allclose(net.sam_features(grid.flip(-1)[None], size), upright.flip(-1), atol=2e-2)


def _view_net(trained, bank):
    from nnsam_core.network import build_nnsam_network
    from nnsam_core.predict import Segmenter

    base = Segmenter(trained[0], "cpu")
    net = build_nnsam_network(base.plans_manager, base.configuration_manager, 1, 8, False,
                              NNSAMConfig(embedding_norm="none"))
    net.attach_bank(bank)
    return net, base.configuration_manager.patch_size


def test_a_turned_view_is_sampled_where_the_patch_lies_in_it(trained):
    """A view turned by 90 degrees is the slice turned (pixel centres land on pixel centres), and an upright patch
    drawing it gets what recomputing on the turned slice gives, turned back: the view's positions follow the turn."""
    from nnsam_core.network import grid_channels

    h = w = 64
    slice_ = torch.from_numpy(np.random.default_rng(0).normal(size=(h, w)).astype(np.float32))
    encoder = _PositionalEncoder()
    bank = EmbeddingBank(encoder, lambda keys: [slice_.numpy() for _ in keys])
    bank.warm([1])
    views = []
    bank.encode = lambda slices: views.append(slices) or encoder(slices)
    bank.warm_views([1], 1, (np.pi / 2, np.pi / 2), (1.0, 1.0))
    turned = torch.rot90(slice_, 1, (0, 1))
    assert bank.view_count(1) == 1 and torch.allclose(views[0][0, 0], turned, atol=1e-4)
    net, _ = _view_net(trained, bank)
    net.train()
    grid = torch.from_numpy(grid_channels((1, h, w), [1])[:, 0])[None]
    size = (h // 8, w // 8)
    resize = lambda e: torch.nn.functional.interpolate(e, size=size, mode="bilinear", align_corners=False)
    clean = resize(encoder(slice_[None, None]))
    recomputed_turned_back = torch.rot90(resize(encoder(turned[None, None])), -1, (2, 3))
    assert not torch.allclose(clean, recomputed_turned_back, atol=0.5)  # the encoder is no rotation-equivariant one
    torch.manual_seed(0)
    draws = [net.sam_features(grid, size) for _ in range(16)]
    from_view = [torch.allclose(d, recomputed_turned_back, atol=2e-2) for d in draws]
    from_clean = [torch.allclose(d, clean, atol=2e-2) for d in draws]
    assert all(v != c for v, c in zip(from_view, from_clean)) and any(from_view) and any(from_clean)
    net.eval()                                                          # inference: the clean slice only
    assert all(torch.allclose(net.sam_features(grid, size), clean, atol=2e-2) for _ in range(8))


def test_where_a_zoomed_view_does_not_reach_the_clean_embedding_is_sampled(trained):
    from nnsam_core.network import grid_channels

    h = w = 64
    slice_ = torch.from_numpy(np.random.default_rng(1).normal(size=(h, w)).astype(np.float32))
    bank = EmbeddingBank(_PositionalEncoder(), lambda keys: [slice_.numpy() for _ in keys])
    bank.warm([1])
    bank.warm_views([1], 1, (0.0, 0.0), (0.5, 0.5))                     # the slice's centre, magnified twice
    bank.get_mapped = lambda keys, device, draw_variant=False, mirrors=None: (
        EmbeddingBank.get_mapped(bank, keys, device, False, mirrors)[0] * 0 + bank._variants[1][:1].float(),
        bank._variant_maps[1][:1].to(device)) if draw_variant else EmbeddingBank.get_mapped(bank, keys, device)
    net, _ = _view_net(trained, bank)
    grid = torch.from_numpy(grid_channels((1, h, w), [1])[:, 0])[None]
    size = (h // 8, w // 8)
    net.eval()
    clean = net.sam_features(grid, size)
    net.train()
    zoomed = net.sam_features(grid, size)                               # always the view (see get_mapped above)
    border = torch.ones(size, dtype=torch.bool)
    border[2:-2, 2:-2] = False                                          # slice positions |q| > 0.5: beyond the view
    assert torch.allclose(zoomed[..., border], clean[..., border])
    assert not torch.allclose(zoomed[..., ~border], clean[..., ~border], atol=0.5)


def test_variants_and_views_are_made_whichever_comes_first():
    bank = _bank()
    bank.warm([1])
    bank.warm_views([1], 2, (0.5, 1.0), (0.8, 1.2))
    bank.warm_variants([1], 3, lambda image: image + 1)
    assert bank.variant_count(1) == 5 and bank.view_count(1) == 2
    bank.warm_variants([1], 3, lambda image: image + 1)                 # made once
    bank.warm_views([1], 2, (0.5, 1.0), (0.8, 1.2))
    assert bank.variant_count(1) == 5 and bank.encoder_calls == 1 + 5


def test_views_count_against_the_variant_limit_and_are_a_benchmark_setting():
    from types import SimpleNamespace

    from nnsam_core.benchmark.runner import Settings
    from nnsam_core.errors import NNSAMError
    from nnsam_core.training import MAX_VARIANT_EMBEDDINGS, nnUNetTrainerNNSAM

    bank = _bank()
    keys = list(range(1, MAX_VARIANT_EMBEDDINGS // 8 + 2))
    with pytest.raises(NNSAMError, match="8 embedding variants and views"):
        nnUNetTrainerNNSAM._warm_embedding_variants(SimpleNamespace(progress_callback=None), bank, keys, 0, 8)
    assert bank.encoder_calls == 0 and bank.view_count(1) == 0
    with pytest.raises(ValueError, match="embedding_views"):
        NNSAMConfig(embedding_views=65)
    settings = Settings(protocol="slices", dataset="d")
    assert "embedding_views" not in settings.comparable()
    settings.embedding_views = 8
    assert settings.nnsam_config("nnsam").embedding_views == 8

"""The linear probe of encoder features (docs/results.md): it must find information that is there, and only that."""

from __future__ import annotations

import torch

from nnsam_lab.probe import fit_and_score


def _labels(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, size, size), generator=g)


def test_probe_reads_classes_that_the_features_encode():
    fit, val = _labels(4, seed=0), _labels(2, seed=1)

    def informative(labels, seed):
        noise = 0.3 * torch.randn(labels.shape[0], 8, *labels.shape[1:], generator=torch.Generator().manual_seed(seed))
        onehot = torch.nn.functional.one_hot(labels, 8).permute(0, 3, 1, 2).float()
        return onehot + noise

    scores = fit_and_score(informative(fit, 2), fit, informative(val, 3), val, n_classes=3)
    assert all(d > 95 for d in scores["dice"].values()), scores


def test_probe_finds_nothing_in_noise():
    fit, val = _labels(4, seed=0), _labels(2, seed=1)
    g = torch.Generator().manual_seed(4)
    noise_fit, noise_val = torch.randn(4, 8, 16, 16, generator=g), torch.randn(2, 8, 16, 16, generator=g)
    scores = fit_and_score(noise_fit, fit, noise_val, val, n_classes=3)
    assert all(d < 50 for d in scores["dice"].values()), scores   # chance level for 3 balanced classes is ~33

"The digits metrics: the shipped classifier, the Fréchet distance against SciPy's reference formula, bad files."
import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from gat_tutorial.data import DataError, DigitsDataset
from gat_tutorial.metrics import (FEATURE_DIM, classifier_features, digits_reference, feature_stats, frechet_distance,
                                  load_digits_classifier)


def test_frechet_distance_matches_the_scipy_sqrtm_formula():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 20, 20))
    s1, s2, mu1, mu2 = a @ a.T, b @ b.T + np.eye(20), rng.normal(size=20), rng.normal(size=20)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance((mu1, s1), (mu2, s2)) == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_is_stable_on_singular_covariances():
    feats = torch.randn(300, 16)
    feats[:, 8:] = 0                                                       # dead features, as after a ReLU
    assert frechet_distance(feature_stats(feats), feature_stats(feats)) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(feature_stats(feats), feature_stats(feats * 2)) > 1


def test_shipped_classifier_reads_the_validation_digits():
    clf, val = load_digits_classifier(), DigitsDataset("val")
    feats, pred = classifier_features(clf, val.images)
    assert feats.shape == (len(val), FEATURE_DIM)
    assert (pred == val.labels).float().mean() >= 0.97
    mu, sigma = digits_reference(clf)
    assert mu.shape == (FEATURE_DIM,) and sigma.shape == (FEATURE_DIM, FEATURE_DIM)


def test_a_wrong_file_is_one_line(tmp_path):
    save_file({"head.weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(DataError, match="other.safetensors: not a digits classifier") as e:
        load_digits_classifier(tmp_path / "other.safetensors")
    assert "\n" not in str(e.value)

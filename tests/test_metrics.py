"The digits metrics: the shipped classifier, FD against SciPy's reference formula, the k-NN metrics against NumPy, the scores the trainer logs, bad files."
import json

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
import torch
from safetensors.torch import save_file

from gat_tutorial.data import DataError, DigitsDataset
from gat_tutorial.metrics import (FEATURE_DIM, DigitsReference, classifier_features, density_coverage, digits_reference,
                                  digits_scores, feature_stats, frechet_distance, in_balls, knn_radii,
                                  load_digits_classifier, precision_recall)

SCORES = ["class_acc", "fd", "class_fd", "precision", "recall", "density", "coverage"]


@pytest.fixture(scope="module")
def clf_and_reference():
    clf = load_digits_classifier()
    return clf, digits_reference(clf)


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


def numpy_prdc(real, fake, k=3):
    "Precision, recall, density, coverage written with SciPy distances and np.partition, as the reference prdc code is."
    d_rr, d_ff, d_rf = (scipy.spatial.distance.cdist(a, b) for a, b in [(real, real), (fake, fake), (real, fake)])
    r_real, r_fake = np.partition(d_rr, k, axis=1)[:, k], np.partition(d_ff, k, axis=1)[:, k]
    inside = d_rf <= r_real[:, None]                                       # (N, M): fake m in the ball of real n
    return (inside.any(0).mean(), (d_rf <= r_fake[None, :]).any(1).mean(), inside.sum() / (k * len(fake)), inside.any(1).mean())


def test_knn_metrics_match_numpy_and_do_not_depend_on_the_chunk_size():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(300, 16, generator=g, dtype=torch.float64), 0.8 * torch.randn(200, 16, generator=g, dtype=torch.float64) + 0.3
    ours = precision_recall(real, fake) + density_coverage(real, fake)
    assert ours == pytest.approx(numpy_prdc(real.numpy(), fake.numpy()), abs=1e-6)   # the fractions are float32
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1                           # not a degenerate case
    assert torch.equal(knn_radii(real, chunk=7), knn_radii(real))
    assert torch.equal(in_balls(fake, real, knn_radii(real), chunk=7), in_balls(fake, real, knn_radii(real)))


def test_shipped_classifier_reads_the_validation_digits(clf_and_reference):
    clf, reference = clf_and_reference
    val, train = DigitsDataset("val"), DigitsDataset("train")
    feats, pred = classifier_features(clf, val.images)
    assert feats.shape == (len(val), FEATURE_DIM)
    assert (pred == val.labels).float().mean() >= 0.97
    assert isinstance(reference, DigitsReference)
    mu, sigma = reference.fd_stats
    assert mu.shape == (FEATURE_DIM,) and sigma.shape == (FEATURE_DIM, FEATURE_DIM)
    assert mu == pytest.approx(feature_stats(feats)[0])                    # FD is measured against the validation digits
    assert reference.features.shape == (len(train), FEATURE_DIM) and torch.equal(reference.labels, train.labels)
    assert len(reference.class_stats) == 10


def test_digits_scores_are_the_logged_keys_as_plain_floats(clf_and_reference):
    clf, reference = clf_and_reference
    val = DigitsDataset("val")
    scores = digits_scores(clf, val.images, val.labels, reference)
    assert list(scores) == SCORES
    assert all(type(v) is float for v in scores.values()), {k: type(v) for k, v in scores.items()}
    json.dumps({k: round(v, 4) for k, v in scores.items()})                # what the trainer writes to metrics.jsonl
    assert scores["fd"] == pytest.approx(0, abs=1e-3)                      # the validation digits against themselves
    assert scores["class_acc"] >= 0.97 and scores["recall"] > 0.8 and scores["coverage"] > 0.3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_digits_scores_on_the_gpu_match_the_cpu(clf_and_reference):
    clf, reference = clf_and_reference                                     # the trainer builds the reference on the CPU
    val = DigitsDataset("val")
    cpu = digits_scores(clf, val.images, val.labels, reference)
    gpu = digits_scores(clf.to("cuda"), val.images.cuda(), val.labels, reference)
    clf.cpu()
    assert gpu == pytest.approx(cpu, rel=1e-3, abs=0.01)                  # a point on a ball's edge may flip


def test_a_wrong_file_is_one_line(tmp_path):
    save_file({"head.weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(DataError, match="other.safetensors: not a digits classifier") as e:
        load_digits_classifier(tmp_path / "other.safetensors")
    assert "\n" not in str(e.value)

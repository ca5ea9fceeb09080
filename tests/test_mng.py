"MNG of lesson 14: noise levels, nested-noise statistics, D's input layout, determinism, the ablations, bad input."
import pytest
import torch
import torch.nn.functional as F

from gat_tutorial.mng import (MNG_LEVELS, MNG_MIN_SIGNAL, MNG_NOISE_FLOOR, mng_input, mng_noise_levels, mng_perturb,
                              msg_levels, sample_mng_noise)


def gen(seed): return torch.Generator().manual_seed(seed)


def theory_corr(t):
    "corr(n_i, n_j) = t_j (1 - t_i) / (t_i (1 - t_j)) for the noisier level i."
    t = t.tolist()
    return torch.tensor([[min(a, b) / max(a, b) * (1 - max(a, b)) / (1 - min(a, b)) for b in t] for a in t])


# ---------------------------------------------------------------- levels
def test_gat_levels_from_the_formula():
    t = mng_noise_levels()
    lam = [(k - 1) / (MNG_LEVELS - 1) for k in range(1, MNG_LEVELS + 1)]        # the paper's 1-based k
    expected = [1 - MNG_MIN_SIGNAL ** (1 - l) + MNG_NOISE_FLOOR for l in lam]
    assert t.dtype == torch.float64 and t.shape == (4,)
    torch.testing.assert_close(t, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(t, torch.tensor([0.885, 0.76, 0.51, 0.01], dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("K", [2, 3, 4, 6])
@pytest.mark.parametrize("schedule", ["exp", "linear"])
def test_levels_decrease_and_share_end_points(K, schedule):
    t = mng_noise_levels(K, schedule=schedule)
    assert len(t) == K and (t[:-1] > t[1:]).all()
    torch.testing.assert_close(t[[0, -1]], torch.tensor([1 - MNG_MIN_SIGNAL + MNG_NOISE_FLOOR, MNG_NOISE_FLOOR],
                                                        dtype=torch.float64))
    signal = 1 - t + MNG_NOISE_FLOOR
    if schedule == 'exp': change, step = signal[1:] / signal[:-1], MNG_MIN_SIGNAL ** (-1 / (K - 1))   # constant ratio
    else: change, step = signal[1:] - signal[:-1], (1 - MNG_MIN_SIGNAL) / (K - 1)                      # constant step
    torch.testing.assert_close(change, torch.full((K - 1,), step, dtype=torch.float64))


def test_linear_middle_levels_less_noisy():
    exp, lin = mng_noise_levels(), mng_noise_levels(schedule='linear')
    assert (lin[1:-1] < exp[1:-1]).all()


# ---------------------------------------------------------------- nested noise
def test_marginal_std_and_nesting_statistics():
    t = mng_noise_levels()
    n = sample_mng_noise((1_000_000,), t, generator=gen(0), dtype=torch.float64)
    assert n.shape == (4, 1_000_000) and n.dtype == torch.float64
    torch.testing.assert_close(n.std(1), t, rtol=3e-3, atol=0)
    torch.testing.assert_close(n.mean(1), torch.zeros(4, dtype=torch.float64), rtol=0, atol=3e-3)
    corr = torch.corrcoef(n)
    torch.testing.assert_close(corr, theory_corr(t).double(), rtol=0, atol=5e-3)
    r = (1 - t[:-1]) / (1 - t[1:])
    torch.testing.assert_close(corr.diagonal(1), r * t[1:] / t[:-1], rtol=0, atol=5e-3)   # consecutive levels


def test_nesting_is_a_markov_chain():
    "Each step adds noise independent of everything cleaner: corr(increment_k, n_j) = 0 for j > k."
    t = mng_noise_levels(5)
    n = sample_mng_noise((500_000,), t, generator=gen(1), dtype=torch.float64)
    r = (1 - t[:-1]) / (1 - t[1:])
    increment = n[:-1] - r[:, None] * n[1:]
    corr = torch.corrcoef(torch.cat([increment, n]))[:4, 4:]
    for k in range(4):
        for j in range(k + 1, 5): assert abs(corr[k, j]) < 6e-3
    torch.testing.assert_close(increment.std(1), (t[:-1] ** 2 - (r * t[1:]) ** 2).sqrt(), rtol=5e-3, atol=0)


def test_real_levels_are_one_rectified_flow_trajectory():
    t = mng_noise_levels()
    x = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    noise = sample_mng_noise(x.shape, t, generator=gen(2), dtype=torch.float64)
    levels = mng_perturb([x] * 4, t, noise)
    for k in range(4): torch.testing.assert_close(levels[k], (1 - t[k].item()) * x + noise[k])
    for k in range(3):                                                          # signal cancels along the chain
        r = (1 - t[k]) / (1 - t[k + 1])
        torch.testing.assert_close(levels[k] - r * levels[k + 1], noise[k] - r * noise[k + 1])


def test_determinism_with_a_generator_and_dtypes():
    t = mng_noise_levels()
    a, b, c = (sample_mng_noise((2, 4, 8, 8), t, generator=gen(s)) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (4, 2, 4, 8, 8) and a.dtype == torch.float32
    assert sample_mng_noise((2, 3), t, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(sample_mng_noise((2, 3), t.tolist(), generator=gen(5)), sample_mng_noise((2, 3), t, generator=gen(5)))


def test_last_level_noise_is_its_own_scaled_normal():
    t = mng_noise_levels()
    n = sample_mng_noise((3, 5), t, generator=gen(6))
    eps = torch.randn(4, 3, 5, generator=gen(6))
    torch.testing.assert_close(n[-1], t[-1].item() * eps[-1])


# ---------------------------------------------------------------- D's input
def test_mng_input_shapes_and_channel_order():
    levels = [torch.full((2, 4, 8, 8), float(k)) for k in range(4)]            # level k holds the value k
    d = mng_input(levels)
    assert d.shape == (2, 16, 8, 8)
    assert torch.equal(d[:, :, 0, 0], torch.arange(4.).repeat_interleave(4).expand(2, 16))   # noisiest first
    assert torch.equal(mng_input(torch.stack(levels)), d)
    assert mng_input([torch.zeros(3, 1, 32, 32)] * 4).shape == (3, 4, 32, 32)


def test_penalty_copy_reuses_the_noise():
    t = mng_noise_levels()
    levels = [torch.randn(2, 4, 8, 8) for _ in range(4)]
    noise = sample_mng_noise((2, 4, 8, 8), t, generator=gen(7))
    delta = [0.01 * torch.randn(2, 4, 8, 8) for _ in range(4)]
    moved = mng_input(mng_perturb([x + d for x, d in zip(levels, delta)], t, noise)) - mng_input(mng_perturb(levels, t, noise))
    torch.testing.assert_close(moved, torch.cat([(1 - tk) * d for tk, d in zip(t.tolist(), delta)], 1))


def test_gradients_reach_every_level():
    t = mng_noise_levels()
    levels = [torch.randn(2, 4, 8, 8, requires_grad=True) for _ in range(4)]
    mng_input(mng_perturb(levels, t, sample_mng_noise((2, 4, 8, 8), t))).sum().backward()
    for k, x in enumerate(levels): torch.testing.assert_close(x.grad, torch.full_like(x, 1 - t[k].item()))


# ---------------------------------------------------------------- MSG ablation
def test_msg_levels_are_nested_resizings():
    x = torch.randn(3, 4, 32, 32)
    lv = msg_levels(x)
    assert len(lv) == 4 and all(l.shape == x.shape for l in lv) and torch.equal(lv[-1], x)
    for k in range(4):
        f = 2 ** (3 - k)
        torch.testing.assert_close(F.avg_pool2d(lv[k], f), F.avg_pool2d(x, f))                  # same block means
        torch.testing.assert_close(lv[k], F.interpolate(F.avg_pool2d(lv[k], f), scale_factor=f))   # constant blocks
    fakes = [torch.randn(3, 4, 32, 32) for _ in range(4)]
    for k, l in enumerate(msg_levels(fakes)): torch.testing.assert_close(F.avg_pool2d(l, 2 ** (3 - k)), F.avg_pool2d(fakes[k], 2 ** (3 - k)))
    assert len(msg_levels(torch.randn(1, 4, 8, 8), K=2)) == 2


# ---------------------------------------------------------------- bad input
def test_bad_input_messages():
    t = mng_noise_levels()
    with pytest.raises(ValueError, match="at least 2 levels"): mng_noise_levels(1)
    with pytest.raises(ValueError, match="unknown MNG schedule 'cos'"): mng_noise_levels(schedule='cos')
    with pytest.raises(ValueError, match="min_signal"): mng_noise_levels(min_signal=0)
    with pytest.raises(ValueError, match="must not grow"): sample_mng_noise((2,), t.flip(0))
    with pytest.raises(ValueError, match=r"\[0, 1\)"): sample_mng_noise((2,), [1.2, 0.5])
    with pytest.raises(ValueError, match="3 levels, 4 noise levels and 4 noise tensors"):
        mng_perturb([torch.zeros(2)] * 3, t, sample_mng_noise((2,), t))
    with pytest.raises(ValueError, match="divisible by 2"): msg_levels(torch.zeros(1, 4, 12, 12))
    with pytest.raises(ValueError, match="2 levels for K=4"): msg_levels([torch.zeros(1, 4, 8, 8)] * 2)

"""tv_bregman must reproduce the paper's skimage call: denoise_tv_bregman on an (H, W, 3) 0..255
array with the old single-kernel behaviour, i.e. skimage >= 0.19 with channel_axis=None."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data, transform
from skimage.restoration import denoise_tv_bregman

from mfv.errors import MfvError
from mfv.render.tv import tv_bregman

PAPER_WEIGHTS = (0.001, 0.01, 0.05, 0.1, 0.4, 0.8, 2.0)


def _skimage(img_hwc: np.ndarray, weight: float, isotropic: bool = True) -> np.ndarray:
    return denoise_tv_bregman(
        img_hwc, weight=weight, max_num_iter=100, eps=1e-3, isotropic=isotropic, channel_axis=None
    )


def _to_torch(imgs_hwc: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs_hwc)).permute(0, 3, 1, 2).to(dtype)


def _tv_l1(x: torch.Tensor) -> torch.Tensor:
    """Mean |horizontal diff| + mean |vertical diff| per sample."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    return dx + dy


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this module single-threaded: on a shared, oversubscribed 2-core box each parallel FFT
    region can stall for ~10 ms, making the 100-iteration loops 10-60x slower. Restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """A clean 227x227 photo and a noisy one (N(0, 25^2)), float64 0..255 HxWx3."""
    rng = np.random.default_rng(0)
    astronaut = transform.resize(data.astronaut(), (227, 227), anti_aliasing=True) * 255.0
    chelsea = transform.resize(data.chelsea(), (227, 227), anti_aliasing=True) * 255.0
    noisy = np.clip(chelsea + rng.normal(0.0, 25.0, chelsea.shape), 0.0, 255.0)
    return [astronaut, noisy]


@pytest.fixture(scope="module")
def photo_batch(photos):
    """The noisy photo with every paper weight and the clean one with three, denoised as ONE
    float32 batch with per-sample weights: (inputs HxWx3, weights, outputs)."""
    imgs = [photos[1]] * len(PAPER_WEIGHTS) + [photos[0]] * 3
    weights = PAPER_WEIGHTS + (0.001, 0.1, 2.0)
    out = tv_bregman(_to_torch(imgs, torch.float32), torch.tensor(weights, dtype=torch.float64))
    return imgs, weights, out


def test_float32_batch_matches_skimage_on_photos(photo_batch):
    imgs, weights, out = photo_batch
    assert out.dtype == torch.float32
    for k, (img, w) in enumerate(zip(imgs, weights, strict=True)):
        ref = _skimage(img, w)
        diff = np.abs(out[k].permute(1, 2, 0).double().numpy() - ref)
        # Acceptance is a mean of 0.5 grey levels; the port is exact up to float32 rounding.
        assert diff.mean() < 1e-3, (w, diff.mean())
        assert diff.max() < 1e-2, (w, diff.max())
        assert np.abs(ref - img).mean() > 0.3  # the call really changed the image


@pytest.mark.parametrize("isotropic", [True, False])
def test_float64_equals_skimage_to_rounding(isotropic):
    """Non-square odd/even size, both TV variants, runs that stop at different iterations."""
    rng = np.random.default_rng(1)
    img = np.clip(
        np.linspace(0, 255, 37 * 50 * 3).reshape(37, 50, 3) + rng.normal(0, 30, (37, 50, 3)), 0, 255
    )
    weights = torch.tensor([0.01, 0.3, 2.0], dtype=torch.float64)
    out = tv_bregman(_to_torch([img] * 3, torch.float64), weights, isotropic=isotropic)
    for k, w in enumerate((0.01, 0.3, 2.0)):
        ref = _skimage(img, w, isotropic=isotropic)
        np.testing.assert_allclose(out[k].permute(1, 2, 0).numpy(), ref, rtol=0, atol=1e-8)


def test_batch_equals_each_sample_alone():
    """Per-sample stopping: converged samples freeze while the others keep iterating."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 24, 31, generator=gen, dtype=torch.float64) * 255.0
    weights = torch.tensor([0.002, 2.0, 0.05, 0.5], dtype=torch.float64)
    batched = tv_bregman(x, weights, max_iter=60, eps=0.05)
    for k in range(4):
        alone = tv_bregman(x[k : k + 1], float(weights[k]), max_iter=60, eps=0.05)
        torch.testing.assert_close(batched[k : k + 1], alone, rtol=0, atol=1e-10)
    # The samples really stopped at different times: more iterations change the low-weight one.
    longer = tv_bregman(x[:1], float(weights[0]), max_iter=60, eps=1e-6)
    assert (longer - batched[:1]).abs().max() > 1e-3


def test_smaller_weight_smooths_more(photo_batch):
    imgs, _, out = photo_batch
    n = len(PAPER_WEIGHTS)  # the first n samples: the noisy photo, weights in increasing order
    tv = _tv_l1(out[:n])
    assert bool((tv[1:] > tv[:-1]).all()), tv
    assert tv[-1] < _tv_l1(_to_torch(imgs[:1], torch.float32))[0]  # weight 2 still denoises


def test_shape_dtype_device_and_fixed_points():
    const = torch.full((2, 3, 9, 8), 100.0, dtype=torch.float16)
    out = tv_bregman(const, 0.05)
    assert out.shape == const.shape and out.dtype == torch.float16 and out.device == const.device
    torch.testing.assert_close(out, const)  # a constant image is a fixed point
    x = torch.rand(1, 3, 8, 8) * 255
    torch.testing.assert_close(tv_bregman(x, 0.1, max_iter=0), x)


@pytest.mark.parametrize(
    ("images", "weight"),
    [
        (torch.rand(3, 8, 8), 0.1),  # not 4-D
        (torch.zeros(1, 3, 1, 8), 0.1),  # too small
        (torch.zeros(2, 3, 8, 8, dtype=torch.int64), 0.1),  # not floating
        (torch.zeros(2, 3, 8, 8), 0.0),  # weight must be positive
        (torch.zeros(2, 3, 8, 8), torch.tensor([0.1, 0.2, 0.3])),  # wrong batch size
        (torch.zeros(2, 3, 8, 8), float("nan")),
    ],
)
def test_rejects_bad_input(images, weight):
    with pytest.raises(MfvError):
        tv_bregman(images, weight)

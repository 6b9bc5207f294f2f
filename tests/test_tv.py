"""tv_bregman must reproduce the paper's skimage call: denoise_tv_bregman on an (H, W, 3) 0..255
array with the old single-kernel behaviour, i.e. skimage >= 0.19 with channel_axis=None, with
both backends (acceptance: mean |difference| <= 0.5 grey levels for weights 0.001..2). The
numba backend, ``auto``'s choice on the CPU, runs skimage's own sweep: equal to rounding.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data, transform
from skimage.restoration import denoise_tv_bregman

import mfv.render.tv.kernels as tv_module
from mfv.core.errors import MfvError
from mfv.core.jit import jit
from mfv.render.tv import tv_bregman
from mfv.render.tv.sweep import torch_tv

PAPER_WEIGHTS = (0.001, 0.01, 0.05, 0.1, 0.4, 0.8, 2.0)
# Backends, and how close each must be to skimage on photos: (mean, max) grey levels.
VARIANTS = {
    "numba": (1e-4, 1e-3),  # skimage's sweep in float32: measured <= 2e-5, 2e-4
    "torch": (1e-3, 1e-2),  # the same iterates up to float32 rounding
}


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


@pytest.fixture(autouse=True)
def _one_thread():
    """Run each test single-threaded: on a shared, oversubscribed 2-core box each parallel
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
    """The noisy photo with every paper weight and the clean one with three, as one float32
    batch with per-sample weights: (inputs HxWx3, weights, skimage outputs, batch tensor)."""
    imgs = [photos[1]] * len(PAPER_WEIGHTS) + [photos[0]] * 3
    weights = PAPER_WEIGHTS + (0.001, 0.1, 2.0)
    refs = [_skimage(img, w) for img, w in zip(imgs, weights, strict=True)]
    return imgs, weights, refs, _to_torch(imgs, torch.float32)


@pytest.mark.parametrize("backend", list(VARIANTS))
def test_float32_batch_matches_skimage_on_photos(photo_batch, backend):
    imgs, weights, refs, batch = photo_batch
    out = tv_bregman(batch, torch.tensor(weights, dtype=torch.float64), backend=backend)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    mean_tol, max_tol = VARIANTS[backend]
    for k, (img, ref, w) in enumerate(zip(imgs, refs, weights, strict=True)):
        diff = np.abs(out[k].permute(1, 2, 0).double().numpy() - ref)
        assert diff.mean() < mean_tol, (w, diff.mean())
        assert diff.max() < max_tol, (w, diff.max())
        assert np.abs(ref - img).mean() > 0.3  # the call really changed the image
    # Smaller weight smooths more (the noisy photo's samples come in increasing weight order).
    tv = _tv_l1(out[: len(PAPER_WEIGHTS)])
    assert bool((tv[1:] > tv[:-1]).all()), tv
    assert tv[-1] < _tv_l1(batch[:1])[0]  # weight 2 still denoises


def test_auto_is_numba_on_cpu(photo_batch):
    _, _, _, batch = photo_batch
    x = batch[[1, 4], :, :80, :90]
    torch.testing.assert_close(tv_bregman(x, 0.4), tv_bregman(x, 0.4, backend="numba"),
                               rtol=0, atol=0)
    assert not torch.equal(tv_bregman(x, 0.4), tv_bregman(x, 0.4, backend="torch"))


@pytest.mark.parametrize("isotropic", [True, False])
def test_float64_torch_exact_equals_skimage_to_rounding(isotropic):
    """Non-square odd/even size, both TV variants, runs that stop at different iterations."""
    rng = np.random.default_rng(1)
    img = np.clip(
        np.linspace(0, 255, 37 * 50 * 3).reshape(37, 50, 3) + rng.normal(0, 30, (37, 50, 3)), 0, 255
    )
    weights = (0.01, 0.3, 2.0)
    x = _to_torch([img] * 3, torch.float64)
    exact = tv_bregman(x, torch.tensor(weights, dtype=torch.float64), isotropic=isotropic,
                       backend="torch")
    for k, w in enumerate(weights):
        ref = _skimage(img, w, isotropic=isotropic)
        np.testing.assert_allclose(exact[k].permute(1, 2, 0).numpy(), ref, rtol=0, atol=1e-8)


@pytest.mark.parametrize("backend", list(VARIANTS))
def test_batch_equals_each_sample_alone(backend):
    """Per-sample stopping: converged samples freeze while the others keep iterating (one torch
    chunk: the batch is small). Single channel, which skimage would squeeze away."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 24, 31, generator=gen, dtype=torch.float64) * 255.0
    weights = torch.tensor([0.002, 2.0, 0.05, 0.5], dtype=torch.float64)
    kwargs = {"max_iter": 60, "eps": 0.05, "backend": backend}
    batched = tv_bregman(x, weights, **kwargs)
    assert batched.shape == x.shape
    for k in range(4):
        alone = tv_bregman(x[k : k + 1], float(weights[k]), **kwargs)
        torch.testing.assert_close(batched[k : k + 1], alone, rtol=0, atol=1e-10)
    # The samples really stopped at different times: more iterations change the low-weight one.
    longer = tv_bregman(x[:1], float(weights[0]), **{**kwargs, "eps": 1e-6})
    assert (longer - batched[:1]).abs().max() > 1e-3


def test_reading_the_stopping_test_less_often_changes_nothing():
    """Accelerators read the per-sample stopping test back every few iterations only; samples
    that stopped in between stay frozen, so the result equals checking every iteration."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 20, 26, generator=gen, dtype=torch.float64) * 255.0
    wt = torch.tensor([0.01, 0.5, 2.0], dtype=torch.float64).view(3, 1, 1, 1)
    every = torch_tv(x, wt, 100, 0.05, True, check_every=1)
    sparse = torch_tv(x, wt, 100, 0.05, True, check_every=8)
    assert torch.equal(every, sparse)


def test_weights_as_numbers_arrays_lists_or_tensors_agree():
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(3)) * 255.0
    ref = tv_bregman(x, torch.tensor([0.3, 0.3], dtype=torch.float64))
    for weight in (0.3, np.float64(0.3), np.array([0.3, 0.3]), [0.3, 0.3]):
        torch.testing.assert_close(tv_bregman(x, weight), ref, rtol=0, atol=1e-6)


def test_a_bad_weight_is_refused_before_any_work():
    x = torch.rand(1, 3, 8, 8)
    for bad in (0.0, -1.0, float("nan"), float("inf"), torch.tensor([0.1, -0.2])):
        with pytest.raises(MfvError, match="weight"):
            tv_bregman(torch.cat([x, x]), bad)


def test_chunked_torch_cpu_batches_equal_one_call_per_image(photo_batch):
    """Two 227x227x3 images exceed one CPU chunk: the result equals one call per image."""
    _, _, _, batch = photo_batch
    x, w = batch[[0, 8]], torch.tensor([0.05, 1.0], dtype=torch.float64)
    together = tv_bregman(x, w, max_iter=15, backend="torch")
    for k in range(2):
        alone = tv_bregman(x[k : k + 1], float(w[k]), max_iter=15, backend="torch")
        torch.testing.assert_close(together[k : k + 1], alone, rtol=0, atol=0)


@pytest.mark.parametrize("backend", list(VARIANTS))
def test_shape_dtype_device_and_fixed_points(backend):
    const = torch.full((2, 3, 9, 8), 100.0, dtype=torch.float16)
    out = tv_bregman(const, 0.05, backend=backend)
    assert out.shape == const.shape and out.dtype == torch.float16 and out.device == const.device
    torch.testing.assert_close(out, const)  # a constant image is a fixed point
    x = torch.rand(1, 3, 8, 8) * 255
    torch.testing.assert_close(tv_bregman(x, 0.1, max_iter=0, backend=backend), x)


@pytest.mark.parametrize(
    ("images", "kwargs"),
    [
        (torch.rand(3, 8, 8), {}),  # not 4-D
        (torch.zeros(1, 3, 1, 8), {}),  # too small
        (torch.zeros(2, 3, 8, 8, dtype=torch.int64), {}),  # not floating
        (torch.zeros(2, 3, 8, 8), {"weight": 0.0}),  # weight must be positive
        (torch.zeros(2, 3, 8, 8), {"weight": torch.tensor([0.1, 0.2, 0.3])}),  # wrong batch size
        (torch.zeros(2, 3, 8, 8), {"weight": float("nan")}),
        (torch.zeros(2, 3, 8, 8), {"backend": "skimage"}),  # not kept: numba runs its sweep
        (torch.zeros(2, 3, 8, 8), {"backend": "numpy"}),
        (torch.zeros(2, 3, 8, 8, device="meta"), {"backend": "numba"}),  # CPU only
    ],
)
def test_rejects_bad_input(images, kwargs):
    with pytest.raises(MfvError):
        tv_bregman(images, **{"weight": 0.1, **kwargs})


# ---- the numba backend ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_photos(imagenette) -> list[np.ndarray]:
    """Two real photos (different classes) as float64 0..255 100x131x3 arrays, one plus noise."""
    rng = np.random.default_rng(5)
    out = []
    for k, wnid in enumerate(("n02102040", "n03417042")):
        path = sorted((imagenette / wnid).iterdir())[3]
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB").resize((131, 100), Image.BILINEAR), np.float64)
        out.append(np.clip(img + rng.normal(0.0, 20.0 * k, img.shape), 0.0, 255.0))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("isotropic", [True, False])
def test_numba_float64_equals_skimage_on_real_photos(real_photos, isotropic):
    """Every paper weight on a clean and a noisy real photo, as one per-sample-weight batch on
    two threads: skimage's iterates up to rounding (measured ~1e-12 grey levels)."""
    imgs = [real_photos[k % 2] for k in range(len(PAPER_WEIGHTS))]
    torch.set_num_threads(2)  # `_one_thread` restores the previous setting afterwards
    weights = torch.tensor(PAPER_WEIGHTS, dtype=torch.float64)
    out = tv_bregman(_to_torch(imgs, torch.float64), weights, isotropic=isotropic,
                     backend="numba")
    assert out.dtype == torch.float64
    for k, (img, w) in enumerate(zip(imgs, PAPER_WEIGHTS, strict=True)):
        ref = _skimage(img, w, isotropic=isotropic)
        assert np.abs(ref - img).mean() > 0.05  # the call really changed the image
        np.testing.assert_allclose(out[k].permute(1, 2, 0).numpy(), ref, rtol=0, atol=1e-8)
    # Alone, a sample's channels run as separate chains: still the batch's result, bit for bit.
    for k in (0, 3):
        alone = tv_bregman(_to_torch(imgs[k:k + 1], torch.float64), PAPER_WEIGHTS[k],
                           isotropic=isotropic, backend="numba")
        torch.testing.assert_close(alone, out[k:k + 1], rtol=0, atol=0)


def _three_speed_batch() -> torch.Tensor:
    """Two float64 images whose channels converge at different speeds: a constant channel (no
    update at all), a smooth ramp and uniform noise, in a different order in each."""
    gen = torch.Generator().manual_seed(7)
    ramp = torch.linspace(0, 255, 23 * 29, dtype=torch.float64).reshape(23, 29)
    noise = torch.rand(23, 29, generator=gen, dtype=torch.float64) * 255.0
    const = torch.full((23, 29), 90.0, dtype=torch.float64)
    return torch.stack([torch.stack([const, ramp, noise]), torch.stack([noise, const, ramp])])


@pytest.mark.parametrize(("batch", "threads"), [(1, 2), (2, 4), (1, 3)])
@pytest.mark.parametrize(("eps", "max_iter"), [(0.05, 100), (1e-9, 40)])
def test_numba_small_batches_split_channels_bit_for_bit(monkeypatch, batch, threads, eps,
                                                         max_iter):
    """With fewer samples than threads the channels run as separate chains; the result (and
    so the pooled stopping iteration) is the one-thread per-sample kernel's, bit for bit, when
    the test stops early and when it runs into the iteration cap."""
    x = _three_speed_batch()[:batch]
    weights = torch.tensor([0.05, 0.7][:batch], dtype=torch.float64)
    kwargs = {"max_iter": max_iter, "eps": eps, "backend": "numba"}
    serial = tv_bregman(x, weights, **kwargs)
    runs = []

    class Spy(tv_module._ChannelRun):
        def run(self, workers):
            runs.append(workers)
            super().run(workers)

    monkeypatch.setattr(tv_module, "_ChannelRun", Spy)
    torch.set_num_threads(threads)
    split = tv_bregman(x, weights, **kwargs)
    assert runs == [min(3 * batch, threads)]
    torch.testing.assert_close(split, serial, rtol=0, atol=0)
    if eps > 1e-6:  # it stopped early: more iterations would change it
        longer = tv_bregman(x, weights, **{**kwargs, "eps": 1e-9})
        assert (longer - split).abs().max() > 1e-3


def test_numba_respects_the_torch_thread_budget(monkeypatch):
    pools = []

    class Recorder(tv_module.ThreadPoolExecutor):
        def __init__(self, workers):
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(tv_module, "ThreadPoolExecutor", Recorder)
    x = torch.rand(5, 3, 10, 12, generator=torch.Generator().manual_seed(4)) * 255.0
    alone = tv_bregman(x, 0.2, backend="numba")  # one thread: no pool
    assert pools == []
    torch.set_num_threads(3)
    pooled = tv_bregman(x, 0.2, backend="numba")
    assert pools == [3]
    torch.testing.assert_close(pooled, alone, rtol=0, atol=0)


@pytest.mark.parametrize("isotropic", [True, False])
def test_numba_edge_cases_equal_skimage(isotropic):
    """2x2 and 2xN images (all border), one iteration, one sample of one channel."""
    rng = np.random.default_rng(3)
    for shape, max_iter in (((2, 2, 3), 100), ((2, 7, 1), 100), ((5, 2, 3), 100), ((9, 6, 3), 1)):
        img = rng.uniform(0, 255, shape)
        ref = denoise_tv_bregman(img, weight=0.3, max_num_iter=max_iter, eps=1e-3,
                                 isotropic=isotropic, channel_axis=None).reshape(shape)
        out = tv_bregman(_to_torch([img], torch.float64), 0.3, max_iter=max_iter,
                         isotropic=isotropic, backend="numba")
        np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), ref, rtol=0, atol=1e-9)


def test_kernels_compile_without_a_writable_cache(monkeypatch):
    """`mfv.core.jit` (the TV and t-SNE kernels'): where numba finds no writable cache
    directory, decorating with cache=True raises; the kernels are then compiled per process
    instead."""
    real = numba.njit

    def no_cache(*args, cache=False, **kwargs):
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return real(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", no_cache)

    def add(a, b):
        return a + b

    compiled = jit()(add)
    assert compiled(2, 3) == 5 and compiled.signatures  # compiled, not the Python function

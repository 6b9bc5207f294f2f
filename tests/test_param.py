"""Image parameterizations: exact start-from-image round trip, gradients, seeded random init."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfv.core.errors import MfvError
from mfv.data.colour import COLOR_CORRELATION_SVD_SQRT
from mfv.render.param import SIGMOID_MARGIN, FourierImage


def _test_image(batch: int, h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    """Smooth ramps plus noise, with pure black and white pixels (clamped by FourierImage)."""
    gen = torch.Generator().manual_seed(h * 1000 + w)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    ramps = torch.stack([xx, yy, 1 - xx * yy]) * 255.0
    img = (ramps + 40.0 * torch.randn(batch, 3, h, w, generator=gen)).clamp(0.0, 255.0)
    img[:, 0, 0, 0] = 0.0
    img[:, 1, -1, -1] = 255.0
    return img.to(dtype)


@pytest.mark.parametrize("size", [(227, 227), (224, 224), (64, 48), (33, 1)])
@pytest.mark.parametrize("decorrelate", [True, False])
def test_fourier_round_trip(size, decorrelate):
    img = _test_image(2, *size)
    out = FourierImage(2, size, init=img, decorrelate=decorrelate)()
    assert out.shape == img.shape and out.dtype == torch.float32
    expected = img.clamp(SIGMOID_MARGIN, 255.0 - SIGMOID_MARGIN)
    assert (out - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("size", [(227, 227), (224, 224), (33, 1)])
def test_fourier_float32_chain_starts_within_a_thousandth_of_a_grey_level(size):
    """exact=False (what the optimizers use): the same image from a float32 chain, to within
    1e-3 grey levels (measured: <= 2e-4), and the same gradients up to float32 rounding."""
    img = _test_image(2, *size)
    exact, fast = (FourierImage(2, size, init=img, exact=e) for e in (True, False))
    out = fast()
    assert out.dtype == torch.float32
    assert (out - exact()).abs().max().item() <= 1e-3
    weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(0))
    grads = []
    for param in (exact, fast):
        (param() * weights).sum().backward()
        grads.append(param.spectrum.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-3 * grads[0].abs().max())


def test_fourier_round_trip_float64_and_set_image():
    img = _test_image(1, 45, 62, torch.float64)
    param = FourierImage(1, (45, 62), init=img)
    assert param.spectrum.dtype == torch.float64
    expected = img.clamp(SIGMOID_MARGIN, 255.0 - SIGMOID_MARGIN)
    assert (param() - expected).abs().max().item() <= 1e-9
    other = 255.0 - img
    param.set_image(other)
    assert (param() - other.clamp(SIGMOID_MARGIN, 255.0 - SIGMOID_MARGIN)).abs().max() <= 1e-9


def test_fourier_forward_matches_numpy_lucid_reference():
    """Lucid's recipe in numpy: backward-normalized irfft2 of spectrum * sqrt(HW) / max(f, 1/max
    (H, W)), divided by 4, colour matrix normalized by its largest column norm, sigmoid."""
    h, w = 20, 15
    param = FourierImage(1, (h, w), generator=torch.Generator().manual_seed(3), sd=0.5)
    spec = param.spectrum.detach().double().numpy()
    spec = spec[..., 0] + 1j * spec[..., 1]
    freqs = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    scale = np.sqrt(h * w) / np.maximum(freqs, 1.0 / max(h, w))
    z = np.fft.irfft2(spec * scale, s=(h, w)) / 4.0
    color = np.array(COLOR_CORRELATION_SVD_SQRT)
    color = color / np.linalg.norm(color, axis=0).max()
    rgb = np.einsum("ij,bjhw->bihw", color, z)
    expected = 255.0 / (1.0 + np.exp(-rgb))
    np.testing.assert_allclose(param().detach().double().numpy(), expected, rtol=0, atol=1e-4)
    assert np.abs(expected - expected.mean()).max() > 1.0  # the test image is not flat


@pytest.mark.parametrize("decorrelate", [True, False])
def test_fourier_gradients_flow_and_optimize(decorrelate):
    param = FourierImage(2, (32, 24), decorrelate=decorrelate,
                         generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(param.parameters(), lr=0.05)
    red_start = param()[:, 0].mean().item()
    for _ in range(5):
        opt.zero_grad()
        loss = -param()[:, 0].mean()
        loss.backward()
        assert param.spectrum.grad is not None and torch.isfinite(param.spectrum.grad).all()
        assert param.spectrum.grad.abs().sum() > 0
        opt.step()
    assert param()[:, 0].mean().item() > red_start + 1.0


def test_fourier_random_init_is_seeded():
    def make(seed: int) -> torch.Tensor:
        return FourierImage(2, (40, 30), generator=torch.Generator().manual_seed(seed))()

    a, b, c = make(7), make(7), make(8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 0.1
    # Lucid's default sd = 0.01 gives a faintly textured mid-grey image.
    assert (a - 127.5).abs().max() < 20.0 and a.std() > 0.05


def test_bad_init_raises():
    cls = FourierImage
    with pytest.raises(MfvError):
        cls(2, (8, 8), init=torch.zeros(1, 3, 8, 8))  # wrong batch
    with pytest.raises(MfvError):
        cls(1, (8, 8), init=torch.zeros(1, 3, 8, 8, dtype=torch.uint8))  # not floating
    with pytest.raises(MfvError):
        cls(0, (8, 8))

"""MACO: the amplitude spectrum accumulator, the phase-only parameterization (its fixed amplitude,
its start from an image) and the optimization loop (objective, batching, seeds, transparency)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import make_tiny, shared_data
from mfv.core.errors import MfvError
from mfv.data.colour import COLOR_CORRELATION_SVD_SQRT, color_matrix
from mfv.data.images import load_rgb
from mfv.data.spectrum import AmplitudeSpectrum, resize_amplitude, spectral_domain
from mfv.models.base import to_tensor
from mfv.models.targets import parse_targets
from mfv.render.maco_param import MacoImage
from mfv.render.objective import Objective
from mfv.render.recipes.maco import MacoSettings, maco_loop, transparency

FAST = MacoSettings(steps=12, crops=3, box=(0.45, 0.45))  # crops ~ the 32 px input: quick signal


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """64 real photos at the tiny model's 32 px, (64, 3, 32, 32) in [0, 1]."""
    folder = shared_data() / "imagenette-train"
    files = [f for d in sorted(folder.iterdir()) for f in sorted(d.iterdir())[:7]][:64]
    preprocess = make_tiny().preprocess
    return torch.stack([to_tensor(preprocess, load_rgb(f, min_side=36)) for f in files])


@pytest.fixture(scope="module")
def amplitude(photos) -> torch.Tensor:
    spectrum = AmplitudeSpectrum()
    spectrum.update(photos[:48])
    return spectrum.result()


def _inverse(images: torch.Tensor) -> torch.Tensor:
    """The decorrelated signal z an image in 0..255 came from: C^-1 logit(x / 255) (exact)."""
    inverse = color_matrix(images.dtype, images.device, inverse=True)
    return torch.einsum("ij,bjhw->bihw", inverse, torch.logit(images / 255.0))


def _inner(spectrum: torch.Tensor, side: int) -> torch.Tensor:
    """rfft2 columns that are not their own conjugate (all but column 0 and, even side, last)."""
    return spectrum[..., 1:side // 2 if side % 2 == 0 else side // 2 + 1]


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


# --- the amplitude spectrum -------------------------------------------------------------------

def test_spectrum_streams_merges_and_equals_the_mean_over_all_images():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(23, 3, 16, 16, generator=gen) ** 2
    spectra = torch.fft.rfft2(spectral_domain(images.double()), norm="ortho").abs()
    expected, rms = spectra.mean(0), (spectra ** 2).mean(0).sqrt()
    stream = AmplitudeSpectrum()
    for part in images.split([5, 0, 11, 7]):
        stream.update(part)
    assert stream.count == 23 and stream.size == 16
    result = stream.result()
    assert result.shape == (3, 16, 9) and result.dtype == torch.float32
    assert result.device.type == "cpu"
    torch.testing.assert_close(result.double(), expected, rtol=1e-5, atol=1e-6)  # float32 FFT
    torch.testing.assert_close(stream.result("rms").double(), rms, rtol=1e-5, atol=1e-6)
    # "rms" carries exactly the images' mean energy (Parseval; rfft columns 1..7 count twice)
    weight = torch.tensor([1.0] + [2.0] * 7 + [1.0], dtype=torch.float64)
    energy = (spectral_domain(images.double()) ** 2).sum() / len(images)
    got = stream.result("rms").double()
    torch.testing.assert_close(((got ** 2) * weight).sum(), energy, rtol=1e-5, atol=0)
    # shards: one per half, merged (an empty one changes nothing), and stored/restored
    first, second = AmplitudeSpectrum(), AmplitudeSpectrum()
    first.update(images[:9])
    second.update(images[9:].double())
    restored = AmplitudeSpectrum.from_state(second.state())
    merged = AmplitudeSpectrum().merge(first).merge(AmplitudeSpectrum()).merge(restored)
    assert merged.count == 23
    torch.testing.assert_close(merged.result(), result, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged.result("rms"), stream.result("rms"), rtol=1e-5, atol=1e-6)
    # the state is sums of a fixed size, whatever the number of images
    assert {k: v.shape for k, v in stream.state().items()} == {
        "sum": (3, 16, 9), "sum_sq": (3, 16, 9), "count": ()}


def test_spectral_domain_is_decorrelated_grey_centred_and_orthonormal():
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    color = np.array(COLOR_CORRELATION_SVD_SQRT)
    color = color / np.linalg.norm(color, axis=0).max()
    expected = np.einsum("ij,bjhw->bihw", np.linalg.inv(color), 4 * (x.numpy() - 0.5))
    u = spectral_domain(x)
    np.testing.assert_allclose(u.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert spectral_domain(torch.full((1, 3, 4, 4), 0.5)).abs().max() == 0  # grey is 0
    # orthonormal FFT: the spectrum's energy (rfft columns 1..n/2-1 count twice) is the pixels'
    spectrum = torch.fft.rfft2(u, norm="ortho").abs() ** 2
    weight = torch.full((7,), 2.0, dtype=torch.float64)
    weight[[0, 6]] = 1.0
    torch.testing.assert_close((spectrum * weight).sum(), (u ** 2).sum(), rtol=1e-12, atol=0)


def test_spectrum_rejects_mixed_sizes_and_empty_results():
    spectrum = AmplitudeSpectrum()
    with pytest.raises(MfvError, match="at least one"):
        spectrum.result()
    spectrum.update(torch.rand(2, 3, 8, 8))
    with pytest.raises(MfvError, match="8 px images"):
        spectrum.update(torch.rand(2, 3, 10, 10))
    with pytest.raises(MfvError, match=r"\(B, 3, S, S\)"):
        spectrum.update(torch.rand(2, 3, 8, 6))
    other = AmplitudeSpectrum()
    other.update(torch.rand(1, 3, 10, 10))
    with pytest.raises(MfvError, match="cannot merge"):
        spectrum.merge(other)
    with pytest.raises(MfvError, match="'mean' or 'rms'"):
        spectrum.result("median")


def test_resize_amplitude_resamples_in_cycles_per_pixel():
    def sampled(n: int) -> torch.Tensor:  # smooth, periodic in fy (as a DFT), fy-asymmetric
        fy = 2 * math.pi * torch.fft.fftfreq(n, dtype=torch.float64).view(-1, 1)
        fx = torch.fft.rfftfreq(n, dtype=torch.float64).view(1, -1)
        g = torch.exp(0.5 * torch.cos(fy) + 0.25 * torch.sin(fy) - 2 * fx ** 2) + 0.3 * fx
        return torch.stack([g, 2 * g, g + 1])

    source = sampled(32)
    assert resize_amplitude(source, 32) is source
    for size in (73, 64, 20):
        out = resize_amplitude(source, size)
        assert out.shape == (3, size, size // 2 + 1) and out.dtype == torch.float64
        torch.testing.assert_close(out, sampled(size), rtol=5e-3, atol=0)
    with pytest.raises(MfvError, match="S // 2 \\+ 1"):
        resize_amplitude(torch.ones(3, 8, 8), 16)


# --- the phase-only image ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("side", [32, 73])
def test_the_amplitude_is_the_fixed_one(amplitude, photos, side):
    """MACO's constraint, checked on the picture itself: undo the sigmoid and the colour matrix
    (both exactly invertible) and the spectrum's amplitude is A on every bin whose phase irfft2
    keeps (all columns but the self-conjugate first and, even side, last); on those it is the
    Hermitian part's, at most A. float64 to ~1e-13 (measured); float32 to 1e-4 (measured)."""
    fixed = resize_amplitude(amplitude.double(), side)
    shape = (3, side, side // 2 + 1)
    uniform = (torch.rand(1, *shape, generator=torch.Generator().manual_seed(2),
                          dtype=torch.float64) * 2 - 1) * math.pi
    image = MacoImage(fixed, torch.zeros(2, *shape, dtype=torch.float64))
    image.set_phase(uniform, [0])
    start = torch.nn.functional.interpolate(photos[60:61].double(), size=(side, side),
                                            mode="bicubic", align_corners=False).clamp(0, 1)
    image.set_image(start * 255, [1])
    with torch.no_grad():
        pixels = image()
    assert pixels.shape == (2, 3, side, side) and pixels.min() > 0 and pixels.max() < 255
    got = torch.fft.rfft2(_inverse(pixels), norm="ortho").abs()
    torch.testing.assert_close(_inner(got, side), _inner(fixed, side).expand(2, -1, -1, -1),
                               rtol=1e-9, atol=0)
    edges = [0, side // 2] if side % 2 == 0 else [0]
    assert torch.all(got[..., edges] <= fixed[..., edges] * (1 + 1e-6))  # A: a float32 mean
    # the same in float32
    image32 = MacoImage(fixed.float(), torch.zeros(2, *shape))
    image32.set_phase(image.spectral_phase().detach().float())
    with torch.no_grad():
        got32 = torch.fft.rfft2(_inverse(image32().double()), norm="ortho").abs()
    torch.testing.assert_close(_inner(got32, side), _inner(fixed, side).expand(2, -1, -1, -1),
                               rtol=1e-3, atol=0)


@pytest.mark.slow
def test_start_phase_is_exact_and_the_start_image_approximately_reproduced(amplitude, photos):
    """The start's phase is reproduced exactly; with the natural (not its own) amplitude the
    picture correlates with the photo (measured here, 12 photos at 32 px: mean 0.84, worst 0.71
    on a 32 px canvas; 0.81, 0.64 on MACO's 73 px one; on 224 px ImageNet photos 0.85 / 0.83,
    PSNR 16.3 / 15.4 dB), while a random phase does not (mean |correlation| 0.14 / 0.10)."""
    starts = photos[48:60] * 255
    image = MacoImage(amplitude, torch.zeros(12, 3, 32, 17))
    image.set_image(starts)
    expected = torch.angle(torch.fft.rfft2(spectral_domain(starts / 255), norm="ortho"))
    torch.testing.assert_close(image.spectral_phase().detach(), expected, rtol=0, atol=1e-4)

    tiny = make_tiny()
    objective = Objective(tiny, parse_targets(["fc:0"], tiny), [0] * 12)
    for settings, bound, worst in ((replace(MacoSettings(), canvas=1.0), 0.8, 0.65),
                                   (MacoSettings(), 0.77, 0.6)):
        out = maco_loop(objective, list(starts), list(range(12)), settings.with_steps(0),
                        amplitude)
        side = settings.canvas_size(32)
        assert out.images.shape == (12, 3, side, side)
        seen = torch.nn.functional.interpolate(out.images, size=(32, 32), mode="bicubic",
                                               antialias=True, align_corners=False)
        corr = _corr(seen, starts)
        assert corr.mean() > bound and corr.min() > worst, corr
        random = maco_loop(objective, [None] * 12, list(range(12)), settings.with_steps(0),
                           amplitude).images
        random = torch.nn.functional.interpolate(random, size=(32, 32), mode="bicubic",
                                                 antialias=True, align_corners=False)
        assert _corr(random, starts).abs().mean() < 0.2


# --- the loop ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_maco_increases_the_objective_and_keeps_the_amplitude(tiny, amplitude, photos):
    targets = parse_targets(["conv2:1", "conv2:3"], tiny, reduction="mean")
    objective = Objective(tiny, targets, [0, 1])
    settings = replace(FAST, steps=40)
    out = maco_loop(objective, [None, photos[50] * 255], [3, 4], settings, amplitude)
    assert out.trace.shape == (2, 40) and np.isfinite(out.trace).all()
    # the mean over the crops, first vs last 5 steps (its step-to-step sd is ~0.02)
    early, late = out.trace[:, :5].mean(1), out.trace[:, -5:].mean(1)
    assert np.all(late > early + 0.04), (early, late)
    side = settings.canvas_size(32)
    assert out.images.shape == (2, 3, side, side)
    assert out.images.device == tiny.device
    # the optimized pictures still have the natural amplitude (float32: see the test above)
    got = torch.fft.rfft2(_inverse(out.images.double()), norm="ortho").abs()
    fixed = resize_amplitude(amplitude.double(), side)
    torch.testing.assert_close(_inner(got, side), _inner(fixed, side).expand(2, -1, -1, -1),
                               rtol=2e-3, atol=0)


@pytest.mark.slow
def test_batch_equals_one_by_one_and_crop_passes_do_not_matter(tiny, amplitude, photos):
    targets = parse_targets(["fc:0", "fc:2", "conv2:1"], tiny)
    start = photos[55] * 255
    starts, seeds, assign = [start, None, start], [1, 2, 3], [0, 1, 2]
    together = maco_loop(Objective(tiny, targets, assign), starts, seeds, FAST, amplitude,
                         max_images=9)  # every crop in one pass
    for b in range(3):
        alone = maco_loop(Objective(tiny, targets, [assign[b]]), [starts[b]], [seeds[b]], FAST,
                          amplitude, max_images=1)  # one crop a pass
        assert (together.images[b] - alone.images[0]).abs().max() < 0.05
        np.testing.assert_allclose(together.trace[b], alone.trace[0], rtol=1e-4, atol=1e-5)
        assert (together.alpha[b] - alone.alpha[0]).abs().max() < 1e-3


@pytest.mark.slow
def test_seeded_runs_are_identical_and_seeds_differ(tiny, amplitude):
    objective = Objective(tiny, parse_targets(["fc:3"], tiny), [0, 0])
    first = maco_loop(objective, [None, None], [7, 8], FAST, amplitude)
    again = maco_loop(objective, [None, None], [7, 8], FAST, amplitude)
    assert torch.equal(first.images, again.images) and torch.equal(first.alpha, again.alpha)
    np.testing.assert_array_equal(first.trace, again.trace)
    assert (first.images[0] - first.images[1]).abs().mean() > 5  # another seed, another picture


@pytest.mark.slow
def test_transparency_accumulates_where_the_crops_look(tiny, amplitude):
    """Crops that always cover the canvas' central 60 %: the transparency is 0 outside them
    (beyond the bilinear footprint), in 0..1, and 1 on its top 20 % (the 80th percentile clip)."""
    settings = replace(FAST, box=(0.6, 0.6), box_sd=0.0, center_sd=0.0, steps=4)
    objective = Objective(tiny, parse_targets(["conv2:2"], tiny, reduction="mean"), [0])
    out = maco_loop(objective, [None], [5], settings, amplitude)
    side = settings.canvas_size(32)
    alpha = out.alpha[0]
    assert out.alpha.shape == (1, side, side) and alpha.min() >= 0 and alpha.max() == 1
    assert (alpha == 1).float().mean() >= 0.2 - 1 / side ** 2
    lo, hi = math.floor(side * 0.2) - 1, math.ceil(side * 0.8) + 1
    outside = torch.ones(side, side, dtype=torch.bool)
    outside[lo:hi, lo:hi] = False
    assert alpha[outside].abs().max() == 0
    assert alpha[~outside].mean() > 0.5


def test_transparency_normalization():
    saliency = torch.arange(100, dtype=torch.float32).view(1, 10, 10).repeat(3, 1, 1)
    saliency[1] = 0
    saliency[2, 1:] = 0  # gradients on 10 % of the canvas only: no clipping
    alpha = transparency(saliency, 80.0)
    ceiling = np.percentile(np.arange(100), 80)
    expected = np.minimum(np.arange(100), ceiling) / ceiling
    np.testing.assert_allclose(alpha[0].flatten().numpy(), expected, rtol=1e-6)
    assert torch.equal(alpha[1], torch.zeros(10, 10))
    np.testing.assert_allclose(alpha[2, 0].numpy(), np.arange(10) / 9, rtol=1e-6)
    assert alpha[2, 1:].abs().max() == 0


def test_settings_are_the_published_defaults_and_checked():
    s = MacoSettings()
    assert (s.steps, s.lr, s.crops, s.box, s.box_sd, s.center_sd) == (256, 1.0, 32, (0.5, 0.05),
                                                                      0.05, 0.15)
    assert s.canvas_size(224) == 512 and s.noise == pytest.approx(0.08 * 127.5)
    assert s.with_steps(10).steps == 10 and s.with_steps(None) is s
    with pytest.raises(MfvError, match="crops >= 1"):
        MacoSettings(crops=0)
    with pytest.raises(MfvError, match="box sizes"):
        MacoSettings(box=(0.5, 0.0))


@pytest.mark.slow
def test_maco_loop_checks_its_inputs(tiny, amplitude):
    objective = Objective(tiny, parse_targets(["fc:0"], tiny), [0])
    with pytest.raises(MfvError, match="amplitude"):
        maco_loop(objective, [None], [0], FAST, torch.ones(3, 32, 32))
    with pytest.raises(MfvError, match="start images"):
        maco_loop(objective, [torch.zeros(3, 16, 16)], [0], FAST, amplitude)

"""`mfv.visualize`: the README's snippet as written (on a tiny stand-in for Lite0, and on Lite0
itself), target strings and functions, every kind of start, and a run's facet as the start."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mfv
from conftest import LiteLike, TinyNet, readme_example, shared_data
from mfv.core.errors import MfvError
from mfv.data.preprocess import Preprocess
from mfv.render.plan import derived_seed

PRE = Preprocess(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.5,) * 3)


def _run_readme(tmp_path, monkeypatch, model_line: str | None = None) -> dict:
    monkeypatch.chdir(tmp_path)
    with Image.open(sorted((shared_data() / "imagenette-train" / "n01440764").iterdir())[0]) as im:
        im.convert("RGB").save("photo.jpg")
    code = readme_example("mfv.visualize(", model_line)
    scope: dict = {"LiteLike": LiteLike}
    exec(code, scope)  # the README's example, as a user runs it
    return scope


def _climbed(result) -> bool:
    return bool(result.activations[0] > result.traces[0][0] and len(result.traces[0]) == 32)


@pytest.mark.slow
def test_the_readme_example_runs_as_written(tmp_path, monkeypatch):
    scope = _run_readme(tmp_path, monkeypatch, "LiteLike()")
    tench, unit = scope["tench"], scope["unit"]
    assert Image.open(tmp_path / "tench.png").size == (224, 224)  # ImageNet's default input
    assert _climbed(tench) and _climbed(unit)
    assert tench.recipe == "anchored" and unit.recipe == "fourier"
    assert tench.to_arrays()[0].dtype == np.uint8 and tench.to_arrays()[0].shape == (224, 224, 3)


@pytest.mark.slow
def test_the_readme_example_on_lite0(tmp_path, monkeypatch):
    scope = _run_readme(tmp_path, monkeypatch)
    assert _climbed(scope["tench"]) and _climbed(scope["unit"])
    assert scope["tench"].target == "_fc:0"


def _visualize(target, **kwargs):
    kwargs = {"steps": 12, "device": "cpu", "recipe": "fourier", **kwargs}
    torch.manual_seed(0)  # the same network every time
    return mfv.visualize(mfv.load_model(TinyNet(), preprocess=PRE), target, **kwargs)


def test_a_target_function_gives_what_its_string_gives():
    by_string = _visualize("conv2:3")
    by_function = _visualize(lambda acts: acts["conv2"][:, 3, 8, 8])  # the centre, as "center"
    np.testing.assert_array_equal(by_string.to_arrays()[0], by_function.to_arrays()[0])
    np.testing.assert_allclose(by_string.traces[0], by_function.traces[0], rtol=1e-6)
    assert by_function.target == "<lambda>"
    with pytest.raises(MfvError, match="one value per sample"):
        _visualize(lambda acts: acts["conv2"])
    with pytest.raises(MfvError, match="no layer 'conv9'; closest: conv"):
        _visualize(lambda acts: acts["conv9"].mean((1, 2, 3)))


def test_every_kind_of_start_is_the_same_picture(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "start.png")
    starts = [str(tmp_path / "start.png"), Image.fromarray(array), array,
              torch.from_numpy(array).permute(2, 0, 1).float()]
    results = _visualize("fc:1", start=starts)  # one picture each, seeds 0, 1, 2, 3
    assert len(results.images) == 4 and len(set(results.activations)) == 4
    first = results.to_arrays()[0]
    for start in starts[1:]:
        alone = _visualize("fc:1", start=start).to_arrays()[0]
        assert np.abs(alone.astype(int) - first).max() <= 1
    big = _visualize("fc:1", start=np.kron(array, np.ones((3, 3, 1), np.uint8)))
    assert big.to_arrays()[0].shape == (32, 32, 3)  # resized and cropped as the model's transform
    with pytest.raises(MfvError, match="cannot read"):
        _visualize("fc:1", start=3.5)


def test_anchored_without_a_facet_is_the_fourier_loop_and_maco_needs_no_scan():
    plain, anchored = _visualize("fc:1"), _visualize("fc:1", recipe="anchored")
    np.testing.assert_array_equal(plain.to_arrays()[0], anchored.to_arrays()[0])
    maco = _visualize("fc:1", recipe="maco", steps=4)
    assert maco.alphas[0] is not None and maco.to_arrays()[0].shape[0] > 32  # its larger canvas


def test_a_runs_facet_is_a_start_and_its_anchor(tmp_path):
    """The facet's picture from `visualize` is the run's own (same start, anchor, seed)."""
    rng = np.random.default_rng(1)
    for i in range(12):
        label = ("red thing", "blue thing")[i % 2]
        (tmp_path / "imgs" / label).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        arr[..., 0 if i % 2 == 0 else 2] = 250
        Image.fromarray(arr).save(tmp_path / "imgs" / label / f"img{i:03d}.png")
    torch.manual_seed(0)
    model = mfv.load_model(TinyNet(), preprocess=PRE)
    results = mfv.run(model=model, images=str(tmp_path / "imgs"), targets=["fc:0 + fc:2"],
                      facets=2,
                      mean_of=3, steps=10, embedding="pca", progress=False, device="cpu",
                      recipes=["anchored"], out=str(tmp_path / "run"), until="render")
    target = results.targets[0]
    seed = derived_seed(0, target.slug, "facet", 1, "anchored")
    shown = mfv.visualize(model, "fc:0 + fc:2", start=(tmp_path / "run", "fc:0 + fc:2", 1),
                          steps=10,
                          seed=seed, device="cpu")
    picture = target.facets[1].visualizations["anchored"]
    saved = np.asarray(Image.open(tmp_path / "run" / picture.path))
    assert np.abs(shown.to_arrays()[0].astype(int) - saved).max() <= 1
    assert shown.activations[0] == pytest.approx(picture.activation, rel=1e-3)
    with pytest.raises(MfvError, match="no facet 5 of target 'fc:0'"):
        mfv.visualize(model, "fc:0", start=(tmp_path / "run", "fc:0", 5), device="cpu")

"""Hidden units (issue 22): where a unit peaks, how much it sees, facets of its patches, and the
two readings of a sum of spatial units."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import adjusted_rand_score
from torch import nn

import mfv
from mfv.core.errors import MfvError
from mfv.data.sources import from_folder
from mfv.facets import patches as crops_of
from mfv.facets.patches import Patches, firing_centre, peak_boxes, resolve_region
from mfv.models import LoadedModel, Preprocess, load_model
from mfv.models.activations import TargetBank, capture, target_value
from mfv.models.receptive import effective_rf, receptive_fields, theoretical_rf
from mfv.models.targets import LayerRef, Target, Term, parse_target
from mfv.render.anchor import Anchor, AnchoredObjective, AnchorSettings
from mfv.render.objective import NEUTRAL, Objective, central_crop, unit_view
from mfv.runtime.rundir import RunDir
from mfv.runtime.settings import make_settings
from mfv.scan.options import ScanOptions
from mfv.scan.scanner import scan

SIZE = 32


class DotNet(nn.Module):
    """conv1 detects red (R - B), blue (B - R) and green (G) pixels at the centre tap; conv2
    (3x3, stride 2) sums each detector over its window; the code (the pool of conv2) thus sees
    a small dot only faintly in a whole photo, and mostly in a crop around it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 3, 3, stride=2, padding=1, bias=False)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            w = torch.zeros(3, 3, 3, 3)
            w[0, 0, 1, 1], w[0, 2, 1, 1] = 1.0, -1.0
            w[1, 2, 1, 1], w[1, 0, 1, 1] = 1.0, -1.0
            w[2, 1, 1, 1] = 1.0
            self.conv1.weight.copy_(w)
            self.conv2.weight.copy_(torch.eye(3)[:, :, None, None].expand(3, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(x)))


def dotnet() -> LoadedModel:
    torch.manual_seed(0)
    return load_model(DotNet(), preprocess=Preprocess(input_size=SIZE, resize_size=SIZE,
                                                      mean=(0.5,) * 3, std=(0.5,) * 3))


def dot_images(folder: Path, n: int, seed: int = 0) -> np.ndarray:
    """n photos: a green or a dark background (alternating in pairs) with a 4x4 red or blue dot
    (alternating) at a random place; returns the dots' kinds (0 red, 1 blue) and their boxes,
    in the order of the sorted file names."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        back = (0.45, 0.9, 0.45) if (i // 2) % 2 else (0.1, 0.15, 0.1)
        arr = np.clip(np.array(back) + rng.normal(0, 0.03, (SIZE, SIZE, 3)), 0, 1)
        top, left = (int(v) for v in rng.integers(2, SIZE - 6, size=2))
        arr[top:top + 4, left:left + 4] = (1.0, 0.0, 0.0) if i % 2 == 0 else (0.0, 0.0, 1.0)
        Image.fromarray((arr * 255).round().astype(np.uint8)).save(folder / f"img{i:03d}.png")
        rows.append((i % 2, top, left))
    return np.array(rows)


# ---------------------------------------------------------------------------- where it peaks
def test_peak_of_a_constructed_unit_is_where_the_dot_is(tmp_path):
    model = dotnet()
    truth = dot_images(tmp_path / "imgs", 12)
    targets = [parse_target("conv2:0", model, "max"), parse_target("conv2:1", model, "center"),
               parse_target("fc:0", model)]
    for mode in ("full", "topn"):
        result = scan(model, from_folder(tmp_path / "imgs"), targets, tmp_path / mode,
                      ScanOptions(batch_size=4, chunk_batches=1, workers=0, mode=mode, top_n=12),
                      progress=False)
        assert result.grid(0) == (16, 16) and result.grid(2) is None
        red = np.flatnonzero(truth[:, 0] == 0)
        centres = result.peak_pixels(0, red)
        # the 4x4 dot covers pixels top..top+3: its centre is at top + 2 (pixel edges)
        np.testing.assert_allclose(centres, truth[red, 1:] + 2, atol=1.0)
        np.testing.assert_array_equal(result.peaks_of(1, red), np.full((len(red), 2), 8))
        assert (result.peaks_of(2, red) == -1).all()


def test_a_topn_scan_keeps_the_peaks_of_its_top_images(tmp_path):
    model = dotnet()
    dot_images(tmp_path / "imgs", 14)
    targets = [parse_target("conv2:0 + 0.5*conv2:2", model, "max")]
    kept = {}
    for mode in ("full", "topn"):
        kept[mode] = scan(model, from_folder(tmp_path / "imgs"), targets, tmp_path / mode,
                          ScanOptions(batch_size=3, chunk_batches=1, workers=0, mode=mode,
                                      top_n=5), progress=False)
    top, _ = kept["topn"].top(0, 5)
    np.testing.assert_array_equal(kept["topn"].peaks_of(0, top), kept["full"].peaks_of(0, top))
    outside = np.setdiff1d(np.arange(14), top)[:2]
    assert (kept["topn"].peaks_of(0, outside) == -1).all()
    assert (kept["full"].peaks_of(0, outside) >= 0).all()


def test_peaks_follow_the_combined_map():
    acts = torch.zeros(2, 3, 4, 5)
    acts[0, 0, 1, 2], acts[0, 1, 3, 4], acts[1, 1, 0, 0] = 5.0, 2.0, 1.0
    ref = LayerRef("L")
    target = Target("L:0 + 3*L:1", (Term(1.0, ref, 0), Term(3.0, ref, 1)), "max")
    peaks, grids = TargetBank([target]).peaks({"L": acts})
    assert grids == [(4, 5)]
    assert peaks[:, 0].tolist() == [[3, 4], [0, 0]]  # 3 * 2 > 5


# ---------------------------------------------------------------------- how much it sees
def test_receptive_field_of_a_stack_of_3x3_convs_is_2n_plus_1():
    convs = [nn.Conv2d(3 if i == 0 else 2, 2, 3, padding=1) for i in range(4)]
    stack = nn.Sequential(*convs, nn.Conv2d(2, 2, 3, stride=2, padding=1), nn.Conv2d(2, 2, 3))
    for depth in range(1, 5):
        assert theoretical_rf(stack, str(depth - 1)) == (2 * depth + 1, 1)
    assert theoretical_rf(stack, "4") == (11, 2)
    assert theoretical_rf(stack, "5") == (11 + 2 * 2, 2)  # a 3x3 after a stride of 2
    with torch.no_grad():  # all-positive weights: the gradient reaches the whole field
        for c in convs:
            c.weight.fill_(0.1)
    model = load_model(stack, preprocess=Preprocess(input_size=SIZE, resize_size=SIZE))
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    whole = effective_rf(model, [LayerRef("3")], images, mass=1.0)["3"]
    core = effective_rf(model, [LayerRef("3")], images, mass=0.5)["3"]
    assert whole == 9 and 1 <= core < 9  # the gradient mass is peaked at the centre
    fields = receptive_fields(model, [LayerRef("2"), LayerRef("4")], images=images)
    assert fields["2"].theoretical == 7 and fields["4"].stride == 2
    assert fields["2"].grid == (SIZE, SIZE) and 1 <= fields["2"].side() <= 7


@pytest.mark.slow
def test_layers_command_shows_receptive_fields(capsys):
    from mfv.cli import main

    main(["layers", "efficientnet_lite0"])
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
             if line.strip()}
    assert "RF" in " ".join(lines["layer"])
    assert lines["_blocks.2"][-2:] == ["4", "19"] and lines["_blocks.5"][-2:] == ["16", "83"]
    assert lines["_fc"][-1] == "1000"  # no grid, no field


# ---------------------------------------------------------------------- facets of patches
def test_peak_boxes_are_centred_and_inside_the_frame():
    boxes = peak_boxes(np.array([[16.0, 16.0], [1.0, 30.0], [31.0, 2.0]]), 8, SIZE)
    assert boxes.tolist() == [[12, 12, 8, 8], [0, 24, 8, 8], [24, 0, 8, 8]]
    assert peak_boxes(np.array([[5.0, 5.0]]), 100, SIZE).tolist() == [[0, 0, 32, 32]]


def test_firing_centre_is_the_middle_of_the_strongest_region_not_a_stray_peak():
    m = np.zeros((10, 10))
    m[2:6, 3:7] = 1.0  # a patch the unit fires on, strongest on its rim
    m[5, 6] = 1.2
    m[8, 1] = 1.5  # a stray spot, higher than the patch
    row, col = firing_centre(m)
    assert 3.0 < row < 4.6 and 4.0 < col < 5.6  # inside the patch, near its middle
    assert np.argmax(m) == 81  # where the crop was centred before
    negative = -np.ones((3, 3))
    negative[1, 0] = -0.5  # nowhere positive: the maximum's cell
    assert firing_centre(negative) == (1.0, 0.0)


def test_patch_crops_of_a_target_centre_on_its_firing_region(tmp_path):
    model = dotnet()
    truth = dot_images(tmp_path / "imgs", 6)
    paths = [str(p) for p in sorted((tmp_path / "imgs").glob("*.png"))]
    target = parse_target("conv2:0 + conv2:1", model, reduction="max", sum_mode="maps")
    corner = lambda idx: np.zeros((len(idx), 2))  # noqa: E731  (a peak far from every dot)
    boxes = Patches(model, paths, corner, 6, LayerRef("fc", use_input=True), target
                    ).boxes(np.arange(6))
    centre = boxes[:, :2] + 3
    assert (np.abs(centre - (truth[:, 1:] + 2)) <= 2).all(), (centre, truth)
    assert (Patches(model, paths, corner, 6, LayerRef("fc", use_input=True))
            .boxes(np.arange(6))[:, :2] == 0).all()


def test_patch_crops_land_on_the_dot(tmp_path):
    model = dotnet()
    truth = dot_images(tmp_path / "imgs", 6)
    paths = [str(p) for p in sorted((tmp_path / "imgs").glob("*.png"))]
    patches = Patches(model, paths, lambda idx: truth[idx, 1:] + 2.0, 4,
                      LayerRef("fc", use_input=True))
    crops = patches.pixels(np.arange(6))
    red = crops[0::2].astype(float)
    assert (red[..., 0] > 200).mean() > 0.95 and (red[..., 2] < 50).mean() > 0.95
    assert patches.codes(np.arange(6)).shape == (6, 3)


def test_a_patch_code_adds_its_inner_square_when_the_crop_is_larger(tmp_path, monkeypatch):
    """`patch_codes`: a box no larger than `INNER_SHARE` of the input is coded alone (its crop
    code); a larger one is the mean of its code and that of its centred inner square (shifted
    inside the frame as `peak_boxes` does); `Patches.codes` is `patch_codes` of its boxes."""
    model = dotnet()
    dot_images(tmp_path / "imgs", 4)
    paths = [str(p) for p in sorted((tmp_path / "imgs").glob("*.png"))]
    layer = LayerRef("fc", use_input=True)
    images = crops_of.frames(model, paths, np.arange(4))
    monkeypatch.setattr(crops_of, "INNER_SHARE", 6 / SIZE)  # a 6 px inner square at 32 px
    boxes = np.array([[4, 6, 16, 16], [0, 0, 6, 6], [16, 16, 16, 16], [10, 3, 4, 4]])

    def code(b: np.ndarray) -> np.ndarray:
        return crops_of.crop_codes(model, crops_of.crop_resize(images[:len(b)], b, SIZE), layer)
    own = code(boxes)
    inner = peak_boxes(boxes[:, :2] + boxes[:, 2:] / 2, 6, SIZE)
    assert inner[2].tolist() == [21, 21, 6, 6]
    mixed = crops_of.patch_codes(model, images, boxes, layer)
    np.testing.assert_allclose(mixed[[1, 3]], own[[1, 3]], rtol=1e-5)  # not larger: alone
    np.testing.assert_allclose(mixed[[0, 2]], (own[[0, 2]] + code(inner)[[0, 2]]) / 2,
                               rtol=1e-5)
    assert not np.allclose(mixed[[0, 2]], own[[0, 2]], rtol=1e-3)  # the inner square counts
    centres = boxes[:, :2] + boxes[:, 2:] / 2
    held = Patches(model, paths, lambda idx: centres[idx], 16, layer)
    np.testing.assert_allclose(held.codes(np.arange(4)),
                               crops_of.patch_codes(model, images, held.boxes(np.arange(4)),
                                                    layer), rtol=1e-5)


def test_region_auto_is_patch_for_hidden_spatial_units_read_at_a_place_only():
    ref = LayerRef("L")
    hidden = Target("L:0", (Term(1.0, ref, 0),))
    assert resolve_region("auto", hidden, (4, 4)) == "patch"
    assert resolve_region("auto", Target("L:0", (Term(1.0, ref, 0),), "max"), (4, 4)) == "patch"
    averaged = Target("L:0", (Term(1.0, ref, 0),), "mean")  # every place counts
    assert resolve_region("auto", averaged, (4, 4)) == "image"
    assert resolve_region("patch", averaged, (4, 4)) == "patch"
    assert resolve_region("auto", hidden, None) == "image"
    assert resolve_region("image", hidden, (4, 4)) == "image"
    with pytest.raises(MfvError, match="--region patch"):
        resolve_region("patch", hidden, None)


def test_patch_facets_split_by_the_dot_whole_photos_by_background(tmp_path):
    model = dotnet()
    truth = dot_images(tmp_path / "imgs", 40)
    common = dict(model=model, images=str(tmp_path / "imgs"), targets=["conv2:0 + conv2:1"],
                  reduction="max", selection="top", top_n=40, facets=2, progress=False,
                  baseline=False, steps=10, recipes=["paper-mean"], judges=[], mean_of=3)
    aris = {}
    for region in ("patch", "image"):
        record = mfv.run(out=str(tmp_path / region), region=region, until="report"
                         if region == "patch" else "facets", **common).to_dict()["targets"][0]
        labels = {int(Path(p).stem[3:]): f["rank"] for f in record["facets"]
                  for p in f["members"]}
        chosen = sorted(labels)
        aris[region] = adjusted_rand_score(truth[chosen, 0], [labels[i] for i in chosen])
        (folder,) = (tmp_path / region / "targets" / record["slug"] / "facets").iterdir()
        key = json.loads((folder / "facets.json").read_text())["key"]
        stored = RunDir(tmp_path / region).target(record["slug"]).load_facets(key)[0]
        if region == "patch":
            assert stored.settings["region"] == "patch" and stored.boxes.shape == (40, 4)
            assert stored.settings["patch_side"] == 7  # the ERF (<= 5 px), kept >= 3/14 of 32
            assert [len(f["boxes"]) for f in record["facets"]] == [f["size"] for f in
                                                                    record["facets"]]
            page = (tmp_path / region / "index.html").read_text()
            # the strip shows crops, each a link to the whole photo with the crop outlined
            links = re.findall(r'<a href="([^"]+)" target="_blank" rel="noopener"><img '
                               r'class="thumb" src="([^"]+)"', page)
            assert len(links) == sum(min(12, f["size"]) for f in record["facets"])
            whole, crop = (Image.open(tmp_path / region / u) for u in links[0])
            assert whole.size == (SIZE, SIZE) and crop.size == (128, 128)
            facet = record["facets"][0]
            first = facet["representatives"][0]
            top, left, h, w = facet["boxes"][facet["members"].index(first)]
            diff = np.abs(np.asarray(whole, float) - np.asarray(Image.open(first), float))
            border = np.zeros((SIZE, SIZE), bool)
            border[top:top + h, left:left + w] = True
            border[top + 1:top + h - 1, left + 1:left + w - 1] = False
            assert diff[border].mean() > 3 * diff[~border].mean()  # the box is outlined
            top, left, side = stored.boxes[:, 0], stored.boxes[:, 1], stored.boxes[:, 2]
            dot = truth[stored.selected]
            assert ((dot[:, 1] + 2 >= top) & (dot[:, 1] + 2 <= top + side)
                    & (dot[:, 2] + 2 >= left) & (dot[:, 2] + 2 <= left + side)).all()
        else:
            assert stored.boxes is None
    assert aris["patch"] >= 0.9 > 0.5 > aris["image"], aris
    given = mfv.run(out=str(tmp_path / "given"), region="auto", patch_size=6, until="facets",
                    **common).to_dict()["targets"][0]
    assert {tuple(b[2:]) for f in given["facets"] for b in f["boxes"]} == {(6, 6)}


# --------------------------------------------------------------------------- sums of maps
def test_sum_of_maps_differs_from_the_sum_of_maxima():
    ref = LayerRef("L")
    acts = torch.zeros(1, 2, 4, 4)
    acts[0, 0, 0, 0], acts[0, 1, 3, 3], acts[0, 1, 0, 0] = 1.0, 1.0, 0.5
    terms = (Term(1.0, ref, 0), Term(1.0, ref, 1))
    per_term = Target("L:0 + L:1", terms, "max")
    maps = Target("L:0 + L:1", terms, "max", sum_mode="maps")
    store = {"L": acts}
    assert float(target_value(per_term, store)[0]) == pytest.approx(2.0)  # max A + max B
    assert float(target_value(maps, store)[0]) == pytest.approx(1.5)  # max (A + B), at (0, 0)
    both = TargetBank([per_term, maps])(store)
    assert both[0].tolist() == pytest.approx([2.0, 1.5])
    assert TargetBank([maps]).peaks(store)[0][0, 0].tolist() == [0, 0]
    assert maps.to_dict()["sum"] == "maps" and "sum" not in per_term.to_dict()


def test_sum_maps_needs_one_layer_and_flows_to_the_gradient(tiny):
    with pytest.raises(MfvError, match="one layer"):
        parse_target("conv1:0 + conv2:1", tiny, "max", sum_mode="maps")
    target = parse_target("conv2:0 + 0.5*conv2:3", tiny, "max", sum_mode="maps")
    assert target.sum_mode == "maps"
    assert parse_target("conv2:0", tiny, "max", sum_mode="maps").sum_mode == "terms"
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    with capture(tiny, target.layers) as store:
        tiny(x)
        value = TargetBank([target])(store)[:, 0]
        combined = store["conv2"][:, 0] + 0.5 * store["conv2"][:, 3]
        assert torch.allclose(value, combined.flatten(1).amax(1))
        value.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert make_settings(sum="maps").sum == "maps"
    with pytest.raises(MfvError, match="--sum"):
        make_settings(sum="both")


# --------------------------------------------------------------------------- unit scale
def test_unit_view_shrinks_the_canvas_into_a_grey_frame():
    canvas = torch.zeros(2, 3, SIZE, SIZE)
    canvas[:, 0] = 200.0
    canvas.requires_grad_(True)
    viewed = unit_view(canvas, [8, None], SIZE)
    top = (SIZE - 8) // 2
    inside = viewed[0, :, top:top + 8, top:top + 8]
    assert torch.allclose(inside[0], torch.full((8, 8), 200.0)) and inside[1:].abs().max() == 0
    outside = viewed[0].clone()
    outside[:, top:top + 8, top:top + 8] = NEUTRAL
    assert torch.equal(outside, torch.full_like(outside, NEUTRAL))
    assert torch.equal(viewed[1], canvas[1])  # no side: the canvas as it is
    viewed[0].sum().backward()
    assert canvas.grad[0].abs().sum() > 0 and canvas.grad[1].abs().sum() == 0


def test_objective_at_unit_scale_reads_the_view_and_anchored_keeps_its_own_pass():
    model = dotnet()
    target = parse_target("conv2:0", model, reduction="center")
    images = torch.rand(2, 3, SIZE, SIZE) * 255
    plain = Objective(model, [target], [0, 0])
    scaled = Objective(model, [target], [0, 0], views=[8, None])
    expected = plain(unit_view(images, [8, None], SIZE))
    assert torch.allclose(scaled(images), expected)
    assert not torch.allclose(scaled(images)[0], plain(images)[0])
    assert torch.allclose(scaled(images)[1], plain(images)[1])
    anchors = [Anchor(np.zeros(3), 1.0, 1.0, None)] * 2
    anchored = AnchoredObjective(scaled, anchors, LayerRef("pool"), AnchorSettings(match_weight=0))
    _, value = anchored.maximize(images)
    assert torch.allclose(value, expected)


def test_patch_pictures_are_rendered_and_measured_at_the_units_scale(tmp_path):
    model = dotnet()
    dot_images(tmp_path / "imgs", 24)
    common = dict(model=model, images=str(tmp_path / "imgs"), targets=["conv2:0"],
                  reduction="center", selection="top", top_n=24, facets=2, progress=False,
                  baseline=True, steps=10, recipes=["paper-mean"], judges=[], mean_of=3,
                  region="patch", observer="none")
    target = parse_target("conv2:0", model, reduction="center")
    keys = {}
    for scale, side in (("unit", 7), ("input", None)):  # 7: the ERF, kept >= 3/14 of 32 px
        results = mfv.run(out=str(tmp_path / scale), picture_scale=scale, **common)
        for facet in results.targets[0].facets:  # evaluate reads the pictures the same way
            m = facet.metrics["paper-mean"]
            assert m["activation_central"] == pytest.approx(
                facet.visualizations["paper-mean"].activation, abs=1e-4)
            assert m["path_similarity"] is not None  # against the facet's crops
        (slug_dir,) = (tmp_path / scale / "targets").iterdir()
        entries = RunDir(tmp_path / scale).target(slug_dir.name).render_index()
        keys[scale] = {slot: e.key for slot, e in entries.items()}
        objective = Objective(model, [target], [0], views=[side])
        for entry in entries.values():
            picture = np.asarray(Image.open(slug_dir / entry.files["image"]))
            x = torch.from_numpy(picture.copy()).permute(2, 0, 1)[None].float()
            value = objective(central_crop(x, SIZE))[0]  # what the optimizer drove
            assert entry.activation == pytest.approx(float(value), abs=1e-4)
    assert len(keys["unit"]) == 4 and set(keys["unit"]) == set(keys["input"])
    assert all(keys["unit"][s] != keys["input"][s] for s in keys["unit"])

"""The command line: each command's help lists exactly the settings it uses, settings keep one
flat vocabulary (flags, TOML names, Python keywords) over nested per-stage sections, and every
setting is resolved before the first stage: a mistake is one line, exit status 2, nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TinyNet
from mfv.cli import SECTIONS, build_parser, main
from mfv.runtime.settings import SECTIONS as KINDS
from mfv.runtime.settings import Settings, make_settings

RENDER_FLAGS = {"--recipe", "--steps", "--no-baseline", "--anchor-weight", "--match-layer",
                "--maco-crops", "--batch-size", "--as-written", "--match-weight"}
RAY_FLAGS = {"--backend", "--ray-address", "--ray-workers"}
SWEEP_FLAGS = {"--layers", "--units", "--render", "--embedder"}


def flags(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {s for a in sub._actions for s in a.option_strings if s.startswith("--")}


def section_flags(section: str | None) -> set[str]:
    """The flags of a section's settings (None: the common ones)."""
    fields = Settings.model_fields.items() if section is None else \
        KINDS[section].model_fields.items()
    return {f.json_schema_extra["flag"] for name, f in fields
            if (section or name not in KINDS) and (f.json_schema_extra or {}).get("flag")}


def test_facets_help_lists_no_render_ray_or_sweep_option():
    facets = flags("facets")
    assert not facets & (RENDER_FLAGS | RAY_FLAGS | SWEEP_FLAGS | {"--judges"})
    assert {"--facets", "--top-n", "--embedding", "--mean-of", "--code-layer"} <= facets


def test_scan_help_lists_only_scan_and_common_options():
    expected = section_flags(None) | section_flags("scan") | {"--config", "--debug", "--help"}
    assert flags("scan") == expected
    assert "--facets" not in expected and "--seed" in expected


@pytest.mark.parametrize("command", sorted(SECTIONS))
def test_each_command_lists_exactly_the_sections_it_uses(command):
    from mfv.cli import HIDDEN
    from mfv.runtime.settings import flag_of

    hidden = {flag_of(name) for name in HIDDEN.get(command, ())}
    used = set().union(*(section_flags(s) for s in (None, *SECTIONS[command])))
    assert flags(command) == (used - hidden) | {"--config", "--debug", "--help"}


def test_sweep_help_shows_units_as_a_number_or_all(capsys):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    text = capsys.readouterr().out
    assert "--units N|all" in text and "{all}" not in text
    assert "sweep options:" in text and "--judges" not in text


def test_settings_nest_by_stage_and_keep_flat_names(tmp_path):
    config = tmp_path / "settings.toml"
    config.write_text('top_n = 50\nrecipes = "fourier"\n[facets]\nfacets = "auto"\nmean_of = 4\n'
                      "[render]\nsteps = 20\n")
    s = make_settings(config, seed=3)
    assert (s.scan.top_n, s.facets.top_n, s.facets.k, s.facets.m) == (50, 50, "auto", 4)
    assert (s.render.recipes, s.render.steps, s.facets.seed, s.seed) == (("fourier",), 20, 3, 3)
    assert s.given == {"top_n", "recipes", "facets", "mean_of", "steps", "seed"}
    flat = s.to_dict()  # RUN/settings.json: the flat names, which read back as they are
    assert flat["facets"] == "auto" and flat["top_n"] == 50 and "scan" not in flat
    assert make_settings(**flat) == Settings(**flat)
    assert make_settings(**flat).to_dict() == flat
    config.write_text("[facets]\nrecipes = 'maco'\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) in .*: \[facets\] recipes"):
        make_settings(config)


# --------------------------------------------------------------------- resolved before work
@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny exported network (module paths conv1, conv2, fc) and four small photos."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    dims = {0: torch.export.Dim("batch", min=1), 2: torch.export.Dim.AUTO,
            3: torch.export.Dim.AUTO}
    program = torch.export.export(TinyNet().eval(), (torch.rand(2, 3, 32, 32),),
                                  dynamic_shapes=(dims,))
    torch.export.save(program, root / "tiny.pt2")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(
            root / "imgs" / f"{i}.png")
    return root / "tiny.pt2", root / "imgs"


def refused(capsys, out: Path, *argv: str) -> str:
    """The one line a refused command printed; it exits 2 and writes nothing."""
    assert main([*argv, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mfv: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    return err.strip().removeprefix("mfv: error: ")


@pytest.mark.parametrize("argv, expected", [
    (["run", "--judges", "banana"], "--judges: unknown model 'banana'"),
    (["run", "--code-layer", "conv9"], "--code-layer conv9: model tiny has no layer 'conv9'; "
                                       "closest: conv2, conv1, "),
    (["render", "--match-layer", "relu"], "--match-layer relu: model tiny has no layer 'relu'; "
                                          "closest: relu2, relu1, "),
    (["sweep", "--embedder", "banana"], "--embedder: unknown model 'banana'"),
    (["sweep", "--layers", "conv1,conv9"], "--layers conv9: model tiny has no layer 'conv9'"),
])
def test_every_model_and_layer_is_resolved_before_the_first_stage(world, tmp_path, capsys, argv,
                                                                  expected):
    model, images = world
    target = [] if argv[0] == "sweep" else ["--target", "fc:1"]
    message = refused(capsys, tmp_path / "run", *argv, "--model", str(model), "--images",
                      str(images), *target, "--size", "32", "--device", "cpu")
    assert message.startswith(expected), message


@pytest.mark.parametrize("option", [["--ray-address", "127.0.0.1:1"], ["--ray-workers", "2"]])
def test_ray_options_without_the_ray_backend_are_refused(tmp_path, capsys, option):
    message = refused(capsys, tmp_path / "run", "run", *option, "--target", "fc:1")
    assert message == (f"{option[0]} ({option[0][2:].replace('-', '_')}) is only used with "
                       f"--backend ray; add --backend ray or leave {option[0]} out")


def test_layer_star_is_scanned_by_mfv_scan_and_refused_for_rendering(world, tmp_path, capsys):
    model, images = world
    common = ["--model", str(model), "--images", str(images), "--target", "conv2:*", "--size",
              "32", "--device", "cpu"]
    for command in ("run", "render", "facets"):
        message = refused(capsys, tmp_path / command, command, *common)
        assert message.startswith("--target 'conv2:*': LAYER:* (every unit of a layer) is for "
                                  "`mfv scan`"), message
    out = tmp_path / "scan"
    assert main(["scan", *common, "--out", str(out), "--quiet"]) == 0
    manifest = json.loads(next((out / "scan").glob("*/manifest.json")).read_text())
    assert [t["spec"] for t in manifest["targets"]] == [f"conv2:{u}" for u in range(16)]
    assert manifest["status"] == "complete"


def test_a_misspelt_layer_suggests_the_closest_names_not_the_first_ones():
    from torch import nn

    from mfv.models import load_model
    from mfv.models.targets import resolve_layer

    net = nn.Module()
    net.stem = nn.Conv2d(3, 4, 1)
    net.blocks = nn.Sequential(*(nn.Conv2d(4, 4, 1) for _ in range(10)))
    model = load_model(net)
    with pytest.raises(ValueError, match=r"no layer 'b7'; closest: blocks\.7, "):
        resolve_layer(model, "b7")
    with pytest.raises(ValueError, match=r"no layer 'blocks\.12'; closest: blocks\.[12], "
                                          r"blocks\.[12], "):
        resolve_layer(model, "blocks.12")


@pytest.mark.parametrize("name, message", [
    ("banana", "--judges: unknown model 'banana'; use a built-in"),
    ("/no/such/net.pt2", "--judges /no/such/net.pt2: file not found"),
    ("efficientnet_lite1", None)])
def test_model_names_are_checked_without_loading(name, message):
    from mfv.runtime.prepare import check_model_name

    if message is None:
        assert check_model_name(name, "--judges") is None
    else:
        with pytest.raises(ValueError, match=f"^{message}".replace(".", r"\.")):
            check_model_name(name, "--judges")

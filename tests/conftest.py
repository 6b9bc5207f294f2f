"""Shared fixtures: the real default model, real photos, and a tiny model for fast unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from mfv.models import LoadedModel, Preprocess, load_model
from mfv.models.classes import ClassNames

REPO = Path(__file__).resolve().parents[1]

# Wall times worth seeing in every test run (e.g. `mfv demo`'s), printed in the summary.
WALL_TIMES = pytest.StashKey[dict]()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    for name, seconds in config.stash.get(WALL_TIMES, {}).items():
        terminalreporter.write_line(f"wall time: {name}: {seconds:.0f} s")


def shared_data() -> Path:
    """The project's real photos: $MFV_SHARED_DATA or ../shared/data beside the repository."""
    path = Path(os.environ.get("MFV_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (path / "imagenette-train").is_dir():
        raise RuntimeError(f"real test photos not found at {path}; set MFV_SHARED_DATA")
    return path


@pytest.fixture(scope="session")
def imagenette() -> Path:
    return shared_data() / "imagenette-train"


@pytest.fixture(scope="session")
def lite0() -> LoadedModel:
    return load_model("efficientnet_lite0")


class TinyNet(nn.Module):
    """A small CNN with a conv stack, a ReLU and a linear head: enough to address every kind
    of unit (conv channel, pre/post activation, penultimate features, logits)."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(x)))


def make_tiny(seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    names = ClassNames(("red thing", "green thing", "blue thing", "grey-ish thing", "dark"))
    return load_model(TinyNet(), preprocess=Preprocess(input_size=32, resize_size=36,
                                                       mean=(0.5,) * 3, std=(0.5,) * 3),
                      classes=names)


@pytest.fixture()
def tiny() -> LoadedModel:
    return make_tiny()

"""The Ray backend on a real local Ray instance: the same results as the local backend, a killed
worker retried without losing or duplicating work, a worker's error naming its unit, a driver
interrupted mid-render resuming with the finished pictures kept, and the command line."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

import mfv
from conftest import CLASSES, HANG_S, PRE, comparable, make_images, start, tiny_net
from mfv.cli import main
from mfv.core.errors import MfvError
from mfv.results.model import Results
from mfv.runtime.backend import RayBackend, gpu_share

TESTS = Path(__file__).resolve().parent
RUN = dict(targets=["fc:0 + fc:2", "conv2:3"], facets=2, mean_of=3, steps=10, embedding="pca",
           recipes=["paper-mean", "anchored"], scan_batch_size=4, batch_size=4,
           progress=False, device="cpu")


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance of 2 CPUs; the workers import the tests' model classes."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    paths = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": paths}})
    yield
    ray.shutdown()


class Pause:
    """A forward pre-hook that waits, so a stage lasts long enough to be killed in: the network
    stays the tiny one (its class, weights and fingerprint), so its results must match."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, module, inputs) -> None:
        time.sleep(self.seconds)


def tiny(delay: float = 0.0) -> mfv.LoadedModel:
    module = tiny_net()
    if delay:
        module.register_forward_pre_hook(Pause(delay))
    return mfv.load_model(module, preprocess=PRE, classes=CLASSES)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("ray") / "imgs", n=24)


@pytest.fixture(scope="module")
def local(tmp_path_factory, images) -> Results:
    return mfv.run(model=tiny(), images=str(images), out=str(tmp_path_factory.mktemp("local")),
                   **RUN)


@pytest.fixture()
def workers(cluster):
    """Two workers on the tiny network (the cluster's 2 CPUs: one backend at a time)."""
    with RayBackend(tiny(), workers=2) as backend:
        yield backend


def test_ray_gives_the_results_of_the_local_backend(tmp_path, images, local, workers):
    remote = mfv.run(model=tiny(), images=str(images), out=str(tmp_path / "run"),
                     backend=workers, **RUN)
    assert comparable(remote.to_dict()) == comparable(local.to_dict())
    for ours, theirs in zip(remote.targets, local.targets, strict=True):
        assert [f.members for f in ours.facets] == [f.members for f in theirs.facets]
        np.testing.assert_allclose([p.activation for p in ours.map],
                                   [p.activation for p in theirs.map], rtol=1e-5)
    shards = json.loads(next((tmp_path / "run" / "scan").glob("*/manifest.json")).read_text())
    assert shards["status"] == "complete"


def _sleep_then_pid(worker, seconds: tuple[float, ...], unit: int) -> int:
    """A unit of work that takes `seconds[unit]` and says which worker ran it."""
    time.sleep(seconds[unit])
    return os.getpid()


def test_each_unit_goes_to_whichever_worker_is_free(workers):
    """A slow unit holds up only its own worker: the other one takes every unit after it (round
    robin would give the slow unit's worker every other unit), and results keep their order."""
    units = _Counted(4)
    pids = list(workers.imap(_sleep_then_pid, (3.0, 0.05, 0.05, 0.05), units))
    assert set(pids) == set(workers.worker_pids())
    assert pids[1] == pids[2] == pids[3] != pids[0]
    assert units.taken == [0, 1, 2, 3]  # each unit built once (lazy task lists build on access)


class _Counted(Sequence):
    """The units 0..n-1, noting each access."""

    def __init__(self, n: int) -> None:
        self.n, self.taken = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.taken.append(i)
        return i


def test_a_worker_killed_mid_scan_is_retried_and_nothing_is_lost(tmp_path, images, local,
                                                                 cluster):
    out = tmp_path / "run"
    with RayBackend(tiny(delay=0.15), workers=2) as backend:
        victim = backend.worker_pids()[0]

        def kill_when_the_scan_runs() -> None:
            deadline = time.monotonic() + HANG_S
            while not list(out.glob("scan/*/chunks/*.json")) and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_the_scan_runs)
        killer.start()
        remote = mfv.run(model=tiny(), images=str(images), out=str(out), backend=backend,
                         **{**RUN, "scan_batch_size": 1})
        killer.join()
        assert victim not in backend.worker_pids()  # it died and was replaced
    assert comparable(remote.to_dict()) == comparable(local.to_dict())


class FailingNet(torch.nn.Module):
    """TinyNet's layers, failing whenever a gradient is asked for (i.e. while rendering)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_net()

    def forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("this GPU is on fire")
        return self.inner(x)


def test_a_worker_error_names_its_unit(tmp_path, images, cluster):
    model = mfv.load_model(FailingNet(), preprocess=PRE, classes=CLASSES)
    with pytest.raises(MfvError, match=r"render batch of 4 paper-mean pictures .* failed on a "
                                       r"Ray worker: RuntimeError: this GPU is on fire"):
        mfv.run(model=model, images=str(images), out=str(tmp_path / "run"), backend="ray",
                ray_workers=2, **{**RUN, "targets": ["inner.fc:0 + inner.fc:2"]})
    failed = json.loads((tmp_path / "run" / "results.json").read_text())
    assert failed["status"] == "failed" and failed["stages"]["facets"] == "done"


def _slow_ray_run(out: str, images: str) -> None:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(TESTS)}})
    mfv.run(model=tiny(delay=0.02), images=images, out=out, backend="ray", ray_workers=2,
            **{**RUN, "batch_size": 2})


def test_an_interrupted_driver_resumes_with_the_finished_pictures(tmp_path, images, local,
                                                                  cluster):
    out = tmp_path / "run"
    log = tmp_path / "driver.log"
    fork = multiprocessing.get_context("forkserver")
    proc = start(fork, log, _slow_ray_run, str(out), str(images))
    deadline = time.monotonic() + 3 * HANG_S
    while len(list(out.glob("targets/*/*.png"))) < 2:
        assert proc.is_alive(), log.read_text()
        assert time.monotonic() < deadline, "no picture in time"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray instance
    proc.join()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("targets/*/*.png")
                if p.name.startswith(("facet", "random"))}
    indexed = [json.loads(p.read_text())["entries"] for p in out.glob("targets/*/render.json")]
    kept = {e["files"]["image"] for entries in indexed for e in entries}
    with RayBackend(tiny(), workers=2) as backend:
        remote = mfv.run(model=tiny(), images=str(images), out=str(out), backend=backend,
                         **{**RUN, "batch_size": 2})
    assert comparable(remote.to_dict()) == comparable(local.to_dict())
    for path, stamp in finished.items():  # every indexed picture was kept, not redone
        if path.name in kept:
            assert path.stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_the_command_line_runs_and_sweeps_on_ray(tmp_path, images, local, cluster, capsys):
    module = tiny_net()
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    torch.export.save(torch.export.export(module, (torch.rand(2, 3, 32, 32),),
                                          dynamic_shapes=(dims,)), tmp_path / "tiny.pt2")
    common = ["--model", str(tmp_path / "tiny.pt2"), "--images", str(images), "--size", "32",
              "--device", "cpu", "--quiet", "--backend", "ray", "--ray-workers", "2"]
    assert main(["run", *common, "--target", "fc:1", "--facets", "2", "--mean-of", "3",
                 "--steps", "10", "--embedding", "pca", "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "complete" and results["settings"]["backend"] == "ray"
    assert main(["sweep", *common, "--layers", "conv1,conv2,fc", "--units", "2", "--top-n",
                 "12", "--embedder", "efficientnet_lite0", "--embedding", "pca", "--mean-of",
                 "3", "--out", str(tmp_path / "sweep")]) == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "sweep" / "sweep" / "sweep.json").read_text())
    local_sweep = mfv.sweep(model=str(tmp_path / "tiny.pt2"), images=str(images), size=32,
                            device="cpu", progress=False, layers="conv1,conv2,fc", units=2,
                            top_n=12, embedder="efficientnet_lite0", embedding="pca",
                            mean_of=3, out=str(tmp_path / "sweep-local"))
    assert doc["layers"] == json.loads(json.dumps(local_sweep["layers"]))


@pytest.mark.slow
def test_a_bad_ray_address_is_one_line(tmp_path, images, capsys):
    if ray.is_initialized():
        ray.shutdown()
    code = main(["run", "--images", str(images), "--target", "tench", "--backend", "ray",
                 "--ray-address", "127.0.0.1:1", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--ray-address 127.0.0.1:1" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_real_model_on_real_photos_gives_the_local_results(tmp_path, imagenette, cluster):
    """Lite0 over photos of tench and parachute on 2 Ray workers: scan, facets and render give
    what the local backend gives with the same arithmetic (one torch thread, as each worker)."""
    listing = tmp_path / "photos.txt"
    photos = [p for c in ("n01440764", "n03888257") for p in sorted((imagenette / c).iterdir())[:6]]
    listing.write_text("\n".join(map(str, photos)) + "\n")
    settings = dict(images=str(listing), targets=["_fc:0 + _fc:701"], facets=2, mean_of=3,
                    steps=10, recipes=["anchored"], judges=[], embedding="pca", device="cpu",
                    progress=False, until="render", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker: torch's CPU kernels split their sums by the
    try:  # thread count, and activation maximization amplifies the last bits (README, Scale out)
        local = mfv.run(model="efficientnet_lite0", out=str(tmp_path / "local"), **settings)
    finally:
        torch.set_num_threads(threads)
    model = mfv.load_model("efficientnet_lite0")
    with RayBackend(model, workers=2) as backend:
        remote = mfv.run(model=model, out=str(tmp_path / "ray"), backend=backend, **settings)
    ours, theirs = remote.targets[0], local.targets[0]
    assert [sorted(f.members) for f in ours.facets] == [sorted(f.members) for f in theirs.facets]
    assert {Path(m).parent.name for f in ours.facets for m in f.members} == \
        {"n01440764", "n03888257"}
    np.testing.assert_allclose([p.activation for p in ours.map],
                               [p.activation for p in theirs.map], rtol=1e-4)
    np.testing.assert_allclose(
        [f.visualizations["anchored"].activation for f in ours.facets],
        [f.visualizations["anchored"].activation for f in theirs.facets], rtol=1e-3)


@pytest.mark.parametrize(("workers", "gpus"), [(1, 1), (4, 8), (2, 1), (3, 1), (3, 2), (16, 1),
                                               (7, 3)])
def test_more_workers_than_gpus_share_them_and_never_ask_for_more_than_there_are(workers, gpus):
    """A worker holds a whole GPU while there are enough; more workers share them equally
    (16 on one GPU: 1/16 each, so a node's cores run the CPU-bound units side by side), in
    Ray's 1e-4 steps and never more in all than the cluster has."""
    share = gpu_share(workers, gpus)
    assert 0 < share <= 1 and round(share * 1e4) == pytest.approx(share * 1e4)
    assert workers * share <= gpus + 1e-9
    if workers <= gpus:
        assert share == 1.0
    else:
        assert workers * share > gpus - workers * 1e-4  # the GPUs divided, not left idle


def test_more_workers_than_a_gpu_can_be_shared_among_is_a_clear_error():
    with pytest.raises(MfvError, match="--ray-workers 20000: .* at most 10,000"):
        gpu_share(20000, 1)

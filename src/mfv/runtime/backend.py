"""Where the stages' units of work run: in this process, or on a Ray cluster.

The pipeline cuts every stage into independent units — scan shards, one target's facets, one
batch of pictures, one target's evaluation — and hands them to a backend's `imap(work, context,
units)`, which returns each unit's result in order. `work(worker, context, unit)` is a
module-level function; `worker` is a `Worker`: the model (loaded once per worker process) and a
cache for what else a worker keeps (the judge networks). Units read their inputs from, and write
their outputs to, the run directory, which every worker must see (a shared file system on a real
cluster); the driver alone writes indexes and the public files.

- `LocalBackend`: the units one after the other, in this process, on the run's model.
- `RayBackend`: one Ray actor per worker, each holding its own copy of the model (and a GPU when
  the run uses one); each unit goes to whichever worker is free. A worker that dies is
  restarted and its unit retried (a unit's writes are atomic and keyed, so a retry neither
  loses nor duplicates work); a unit that raises stops the run with a message naming it.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from mfv.core.allocator import keep_freed_memory
from mfv.core.errors import MfvError

if TYPE_CHECKING:
    from mfv.models import LoadedModel

BACKENDS = ("local", "ray")
RETRIES = 3  # restarts of a dead Ray worker, and retries of the unit it was running
START_TIMEOUT_S = 120  # how long the workers may take to start (import torch, load the model)
USAGE_STATS = "RAY_USAGE_STATS_ENABLED"  # Ray's usage reporting: off unless the user says


@dataclass
class Worker:
    """What a unit of work runs with: the model, and a cache for the worker's lifetime."""

    model: LoadedModel
    cache: dict[str, Any] = field(default_factory=dict)


Work = Callable[[Worker, Any, Any], Any]


class Backend(Protocol):
    workers: int

    def imap(self, work: Work, context: Any, units: Sequence[Any],
             label: Callable[[Any], str] = str) -> Iterator[Any]:
        """Each unit's result, in the units' order, as soon as it (and those before) is done."""
        ...

    def close(self) -> None: ...


def run_all(backend: Backend, work: Work, context: Any, units: Sequence[Any],
            label: Callable[[Any], str] = str) -> list[Any]:
    """Every unit's result, in order."""
    return list(backend.imap(work, context, units, label))


class _Closing:
    """Backends close their workers at the end of a `with` block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


class LocalBackend(_Closing):
    """Every unit in this process, in order, on one `Worker`."""

    workers = 1

    def __init__(self, model: LoadedModel) -> None:
        self.worker = Worker(model)

    def imap(self, work: Work, context: Any, units: Sequence[Any],
             label: Callable[[Any], str] = str) -> Iterator[Any]:
        for unit in units:
            yield work(self.worker, context, unit)

    def close(self) -> None:
        self.worker.cache.clear()


class RayBackend(_Closing):
    """Units on Ray actors, one per worker, results in order (module doc).

    `address`: None starts a local Ray instance (or uses the one this process already started),
    "auto" or "HOST:PORT" joins a running cluster. `workers`: how many actors (default: one per
    CPU of the cluster, or per GPU when the model is on one; more than the GPUs share them,
    `gpu_share`).
    """

    def __init__(self, model: LoadedModel, address: str | None = None,
                 workers: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise MfvError("--backend ray needs Ray: pip install 'mfv[ray]'") from None
        self._ray = ray
        if not ray.is_initialized():
            _check_reachable(address)
            given = os.environ.get(USAGE_STATS)
            os.environ.setdefault(USAGE_STATS, "0")  # for the Ray that this starts, not after
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            except ConnectionError as exc:
                raise _no_cluster(address, exc) from None
            finally:
                if given is None:
                    os.environ.pop(USAGE_STATS, None)
        on_gpu = model.device.type == "cuda"
        resources = ray.cluster_resources()
        available = int(resources.get("GPU" if on_gpu else "CPU", 1))
        self.workers = max(1, workers or available)
        gpus = gpu_share(self.workers, available) if on_gpu else 0.0
        actor = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=RETRIES,
                           max_task_retries=RETRIES)(_RayWorker)
        self._model_ref = ray.put(portable(model))  # kept: restarted workers read it again
        # "cuda": the GPU Ray assigned the actor (its CUDA_VISIBLE_DEVICES), whichever index
        # the driver's model was on
        self.actors = [actor.remote(self._model_ref, "cuda" if on_gpu else "cpu")
                       for _ in range(self.workers)]
        ready, _ = ray.wait([a.pid.remote() for a in self.actors], num_returns=self.workers,
                            timeout=START_TIMEOUT_S)
        if len(ready) < self.workers:
            self.close()
            raise MfvError(f"Ray started {len(ready)} of {self.workers} workers within "
                           f"{START_TIMEOUT_S} s (each needs 1 CPU"
                           f"{f' and {gpus:g} GPU' if on_gpu else ''}; the cluster has "
                           f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs, "
                           "some perhaps in use); give fewer --ray-workers or a larger cluster")

    def imap(self, work: Work, context: Any, units: Sequence[Any],
             label: Callable[[Any], str] = str) -> Iterator[Any]:
        """Each unit to whichever worker is free (`ray.wait` on the running ones), so a slow
        unit holds up only its own worker; results in the units' order."""
        ray = self._ray
        context_ref = ray.put(context)
        free, running, finished = list(self.actors), {}, {}
        todo = iter(enumerate(units))  # each unit taken once: a lazy sequence builds it then
        for index in range(len(units)):
            while index not in finished:
                for i, item in itertools.islice(todo, len(free)):
                    actor = free.pop()
                    running[actor.run.remote(work, context_ref, item)] = (i, actor, item)
                ready, _ = ray.wait(list(running), num_returns=1)
                done, actor, item = running.pop(ready[0])
                finished[done] = (ready[0], item)
                free.append(actor)
            yield self._result(*finished.pop(index), label)

    def _result(self, ref: Any, unit: Any, label: Callable[[Any], str]) -> Any:
        """A finished unit's result, or its failure as one `MfvError` naming the unit."""
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, MfvError):
                raise MfvError(f"{label(unit)}: {cause}") from None
            raise MfvError(f"{label(unit)} failed on a Ray worker: "
                           f"{type(cause).__name__}: {cause}") from None
        except ray.exceptions.RayError as exc:  # a worker that could not start or run
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            why = next((line for line in reversed(lines) if "Error" in line), lines[-1:])
            raise MfvError(f"{label(unit)}: its Ray worker failed ({type(exc).__name__}: "
                           f"{why}); a model class must be importable on every worker "
                           "(see the README's Scale out)") from None

    def worker_pids(self) -> list[int]:
        """The process ids of the workers (for the fault tests)."""
        return self._ray.get([a.pid.remote() for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []


class _RayWorker:
    """A Ray actor: its own copy of the model, on its device, for every unit it runs."""

    def __init__(self, model: LoadedModel | _FromFile, device: str) -> None:
        import torch

        keep_freed_memory()  # the worker process is mfv's own: its allocator is tuned
        torch.set_num_threads(1)  # one CPU per worker: the cluster's cores are the workers
        self.worker = Worker(unpacked(model).to(device))

    def run(self, work: Callable[[Worker, Any, Any], Any], context: Any, unit: Any) -> Any:
        return work(self.worker, context, unit)

    def pid(self) -> int:
        return os.getpid()


@dataclass
class _FromFile:
    """A model that does not pickle (a torch.export program: its graph holds C++ objects),
    shipped as its file, reloaded by each worker with the driver's weights and settings."""

    file: str
    name: str
    preprocess: Any
    classes: Any
    logits_layer: str | None
    state: dict

    def load(self) -> LoadedModel:
        from mfv.models import load_model

        loaded = load_model(self.file, preprocess=self.preprocess, classes=self.classes,
                            logits_layer=self.logits_layer)
        loaded.module.load_state_dict(self.state)
        loaded.name = self.name
        return loaded


def gpu_share(workers: int, gpus: int) -> float:
    """The GPU each of `workers` actors holds on a cluster of `gpus`: a whole one while there
    are enough, else an equal share (rounded down to Ray's 1e-4 steps), so that more workers
    than GPUs share them and a node's cores run the CPU-bound units (a target's t-SNE, the
    evaluation's decoding) side by side (`benchmarks/spread.py`)."""
    if workers <= gpus:
        return 1.0
    share = math.floor(max(gpus, 1) / workers * 1e4) / 1e4
    if share <= 0:
        raise MfvError(f"--ray-workers {workers}: Ray shares a GPU among at most 10,000 "
                       "workers; give fewer")
    return share


def portable(model: LoadedModel) -> LoadedModel | _FromFile:
    """What to ship to worker processes, on the CPU (each moves it to its own device): the
    model, or its file when it came from a torch.export file (`unpacked` loads it there)."""
    if model.source.get("source") == "torch.export":
        state = {k: v.detach().cpu() for k, v in model.module.state_dict().items()}
        return _FromFile(os.path.abspath(model.source["file"]), model.name, model.preprocess,
                         model.classes, model.logits_layer, state)
    if model.device.type == "cpu":
        return model
    clone = copy.deepcopy(model)
    return clone.to("cpu")


def unpacked(model: LoadedModel | _FromFile) -> LoadedModel:
    """The model a worker process received from `portable`."""
    return model.load() if isinstance(model, _FromFile) else model


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """A HOST:PORT address that nothing answers on is an error now (Ray itself retries it for
    minutes); None and "auto" are Ray's to resolve."""
    if address in (None, "", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise MfvError(f"--ray-address {address}: give HOST:PORT of a Ray head (e.g. "
                       "10.0.0.5:6379) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise _no_cluster(address, exc.strerror or exc) from None


def _no_cluster(address: str | None, why: object) -> MfvError:
    return MfvError(f"--ray-address {address}: no Ray cluster answers ({why}); start one with "
                    "`ray start --head`, or leave --ray-address out to run a local instance")


def make_backend(name: str, model: LoadedModel, address: str | None = None,
                 workers: int | None = None) -> Backend:
    """The backend a run asked for (`--backend`)."""
    if name == "local":
        return LocalBackend(model)
    if name == "ray":
        return RayBackend(model, address, workers)
    raise MfvError(f"--backend {name!r}: choose one of {', '.join(BACKENDS)}")

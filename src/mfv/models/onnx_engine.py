"""Passes without gradients on the CPU through ONNX Runtime, where it pays.

A model's pass up to the layers a reader needs is exported once (torch's TorchScript-based ONNX
exporter, the batch size left free), checked against torch's own pass on the same batch, and
run by ONNX Runtime's CPU engine, which fuses and lays out the graph for the machine: faster
than torch's tuned pass on the CPU, above all for one-thread workers, but each set of layers
costs an export and a session holds an arena of activations. It pays where many images go
through one set of layers in a long stage — the layer study's codes of photos and crops
(`mfv.study.seen`) — and not in a run's evaluation, which reads a few pictures through many
sets of layers, nor in the scan, which is bound by decoding (measured: `benchmarks/engine.py`,
`benchmarks/scan.py --engine`, docs/benchmarks.md). So `engine="torch"` is every reader's
default and the study asks for `"onnxruntime"`. Passes with gradients (rendering) stay in
torch; on CUDA every pass does.

`layer_reader` is the one entry: a pass that reads chosen layers of a [0, 1] batch, through
ONNX Runtime when asked and usable (the model on the CPU, onnxruntime installed, the export and
its check passed), else through torch (`capture` + `inference`). A model that cannot be
exported is read by torch, with a warning naming why. The exported graph is kept in the model's
cache (it travels with the model to worker processes; a session does not, each process opens
its own).
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import cache

import numpy as np
import torch
from torch import nn

from mfv.core.errors import MfvError
from mfv.models.activations import capture
from mfv.models.base import LoadedModel
from mfv.models.passes import inference
from mfv.models.targets import LayerRef

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnxruntime")  # onnxruntime: where it can be used, else torch
CHECK_TOLERANCE = 1e-3  # the export's largest difference from torch, share of the output's range
OPSET = 17

Reader = Callable[[torch.Tensor], list[torch.Tensor]]


@cache
def onnxruntime_version() -> str | None:
    """The installed ONNX Runtime's version, None when it (or onnx, which the export needs) is
    missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def engine_name(model: LoadedModel, engine: str = "torch") -> str:
    """What reads the model's layers under `engine`: "onnxruntime-<version>" or "torch" (part of
    the keys of stored codes: the two differ by float rounding). A model that turns out not to
    export is still read by torch under this name: the same settings give the same codes."""
    if engine not in ENGINES:
        raise MfvError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    version = onnxruntime_version()
    usable = engine == "onnxruntime" and model.device.type == "cpu" and version is not None
    return f"onnxruntime-{version}" if usable else "torch"


@contextmanager
def layer_reader(model: LoadedModel, layers: Sequence[LayerRef], engine: str = "torch"
                 ) -> Iterator[Reader]:
    """Inside the block, `read(images)`: the layers' outputs (float32 tensors on the model's
    device, in `layers`' order) for a (B, 3, H, W) [0, 1] batch, without gradients (module
    doc)."""
    layers = list(layers)
    if engine_name(model, engine) == "torch":
        with _torch_reader(model, layers) as read:
            yield read
        return
    with ExitStack() as fallback:
        by_torch: Reader | None = None

        def read(images: torch.Tensor) -> list[torch.Tensor]:
            nonlocal by_torch
            graph = exported(model, layers, (int(images.shape[2]), int(images.shape[3])))
            if graph is not None:
                return [torch.from_numpy(out) for out in graph.run(images)]
            if by_torch is None:  # opened on first need: the export runs outside its pass
                by_torch = fallback.enter_context(_torch_reader(model, layers))
            return by_torch(images)

        yield read


@contextmanager
def _torch_reader(model: LoadedModel, layers: list[LayerRef]) -> Iterator[Reader]:
    with capture(model, layers, stop=True) as store, inference(model) as forward:

        def read(images: torch.Tensor) -> list[torch.Tensor]:
            forward(images)
            return [store[ref.key].float() for ref in layers]

        yield read


class _Graph:
    """An exported pass: its ONNX bytes and, once run in this process, its session (not
    pickled: a worker process opens its own, with its own thread count)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._session = None
        self._threads = 0

    def __getstate__(self) -> dict:
        return {"data": self.data}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["data"])

    def close(self) -> None:
        """Drop the session and its memory arena (a later run opens a new one)."""
        self._session = None

    def run(self, images: torch.Tensor) -> list[np.ndarray]:
        threads = torch.get_num_threads()  # as many as torch would use here
        if self._session is None or self._threads != threads:
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            options.enable_mem_pattern = False  # no plan per input shape: batches vary
            self._session = onnxruntime.InferenceSession(
                self.data, options, providers=["CPUExecutionProvider"])
            self._threads = threads
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        return self._session.run(None, {"images": x})


class _Layers(nn.Module):
    """The model's pass from a [0, 1] batch to the captured layers' outputs (what is exported;
    the capture stops the pass at the deepest of them)."""

    def __init__(self, model: LoadedModel, layers: list[LayerRef]) -> None:
        super().__init__()
        self.model, self.layers = model, layers
        self.network = model.module  # registered, so the exporter sees its parameters

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with capture(self.model, self.layers, stop=True) as store:
            self.model(images)
        return tuple(store[ref.key].float() for ref in self.layers)


def exported(model: LoadedModel, layers: Sequence[LayerRef], size: tuple[int, int]
             ) -> _Graph | None:
    """The model's pass to `layers` at `size` as ONNX, from the model's cache or exported and
    checked now; None (cached too) when it cannot be exported or its outputs differ from
    torch's by more than `CHECK_TOLERANCE` of their range."""
    key = ("onnx", tuple(ref.key for ref in layers), size)
    if key not in model._cache:
        model._cache[key] = _export(model, list(layers), size)
    return model._cache[key]


def _export(model: LoadedModel, layers: list[LayerRef], size: tuple[int, int]) -> _Graph | None:
    sample = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, *size, generator=sample)
    wrapper = _Layers(model, layers).train(False)  # the exporter restores the wrapper's mode
    # on every submodule: a wrapper left in training mode would leave the network in it
    buffer = io.BytesIO()
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's and tracer's notes to developers
            expected = wrapper(images)
            torch.onnx.export(wrapper, (images,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=["images"], dynamic_axes={"images": {0: "batch"}},
                              do_constant_folding=False)
        graph = _Graph(buffer.getvalue())
        got = graph.run(images)
    except Exception as exc:  # an op or control flow the exporter or the runtime cannot take
        log.warning("%s is read by torch, not ONNX Runtime: its export failed (%s)",
                    model.name, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        return None
    for ref, want, out in zip(layers, expected, got, strict=True):
        scale = max(float(want.abs().max()), 1e-6)
        if out.shape != tuple(want.shape) or not np.isfinite(out).all() or \
                float(np.abs(out - want.numpy()).max()) > CHECK_TOLERANCE * scale:
            log.warning("%s is read by torch, not ONNX Runtime: its export's %s differs from "
                        "torch's", model.name, ref.key)
            return None
    return graph


def release_sessions(model: LoadedModel) -> None:
    """Close every ONNX Runtime session the model's exported passes hold in this process: each
    keeps a memory arena as large as its largest batch's activations (a stage's end, before
    worker processes take over, gives it back)."""
    for key, graph in model._cache.items():
        if isinstance(key, tuple) and key[:1] == ("onnx",) and graph is not None:
            graph.close()

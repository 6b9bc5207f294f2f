"""Networks for mfv: loading (built-in EfficientNet-Lite, torchvision, timm, torch.export files,
any module), the layers and targets a run names, hooks that read them, and the passes that run
them fast."""

from mfv.core.lazy import lazy_exports

_EXPORTS = {
    "load_model": "mfv.models.loading", "load_state_dict": "mfv.models.loading",
    "resolve_device": "mfv.models.loading", "DEFAULT_MODEL": "mfv.models.loading",
    "BUILTIN": "mfv.models.loading", "DEVICES": "mfv.models.loading",
    "LoadedModel": "mfv.models.base", "LayerInfo": "mfv.models.base",
    "Preprocess": "mfv.data.preprocess",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

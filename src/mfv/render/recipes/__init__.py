"""The recipes: each module here is one way to render a picture (a `Recipe`, `base.py`), found
by name through this registry.

A recipe module declares the names it registers in a literal `NAMES = (...)` and calls
`register` when imported. `names()` reads those literals without importing anything (so the
settings and `mfv --help` list the recipes without loading torch); `get(name)` imports the
module that declares `name` on first use. A recipe defined elsewhere (a test, a notebook) is
added with `register(recipe)`. Adding a recipe is adding one module here.
"""

from __future__ import annotations

import ast
import functools
import importlib
import pkgutil
from pathlib import Path
from typing import Any

from mfv.core.errors import MfvError
from mfv.core.lazy import lazy_exports

DEFAULT = "anchored"  # the recipe a run and `mfv.visualize` use unless told otherwise

_REGISTRY: dict[str, Any] = {}  # name -> its `base.Recipe`, filled as recipes are imported

_EXPORTS = {
    "Recipe": "mfv.render.recipes.base", "schedule": "mfv.render.recipes.paper",
    "FourierSettings": "mfv.render.recipes.fourier", "MacoSettings": "mfv.render.recipes.maco",
    "AnchorSettings": "mfv.render.anchor",
}
__getattr__, _dir = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted([*_dir(), "DEFAULT", "get", "names", "register"])


@functools.cache
def _declared() -> dict[str, str]:
    """Recipe name → the module of this package that declares it (its `NAMES` literal)."""
    out: dict[str, str] = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        tree = ast.parse((Path(__file__).parent / f"{info.name}.py").read_text("utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "NAMES" for t in node.targets):
                out.update(dict.fromkeys(ast.literal_eval(node.value), info.name))
    return out


def names() -> tuple[str, ...]:
    """Every recipe: those of this package, then those registered at run time."""
    return tuple(dict.fromkeys([*_declared(), *_REGISTRY]))


def register(recipe: Any) -> Any:
    """Make `recipe` available by its name (a later registration of the name replaces it)."""
    _REGISTRY[recipe.name] = recipe
    return recipe


def get(name: Any) -> Any:
    """The recipe called `name` (its module is imported on first use)."""
    if name not in _REGISTRY and name in _declared():
        importlib.import_module(f"{__name__}.{_declared()[name]}")
    if name not in _REGISTRY:
        raise MfvError(f"unknown recipe {name!r}; choose one of {', '.join(names())}")
    return _REGISTRY[name]

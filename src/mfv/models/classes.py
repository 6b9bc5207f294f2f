"""Class names of a classifier, and resolving a user's class name or WordNet id to an index."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from importlib import resources

from mfv.core.errors import MfvError


def _normalize(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


@dataclass(frozen=True)
class ClassNames:
    """Display names, optional WordNet ids and alternative names of a model's classes."""

    names: tuple[str, ...]
    wnids: tuple[str, ...] | None = None
    aliases: tuple[tuple[str, ...], ...] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def _candidates(self, index: int) -> tuple[str, ...]:
        extra = self.aliases[index] if self.aliases else ()
        return (self.names[index], *extra)

    def lookup(self, label: str) -> int | None:
        """Index of a folder label (WordNet id, exact class name or alias), or None."""
        if self.wnids and label in self.wnids:
            return self.wnids.index(label)
        matches = self.matches(label)
        return matches[0] if len(matches) == 1 else None

    def matches(self, name: str) -> list[int]:
        """All classes that have `name` (case and underscores ignored) as a name or alias."""
        key = _normalize(name)
        return [i for i in range(len(self)) if key in map(_normalize, self._candidates(i))]

    def resolve(self, name: str) -> int:
        """Index of the class called `name`; a clear error for no match or several matches."""
        if self.wnids and name in self.wnids:
            return self.wnids.index(name)
        found = self.matches(name)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            listed = ", ".join(f"{i} ({self.names[i]})" for i in found)
            raise MfvError(
                f"class name {name!r} matches several classes: {listed}; "
                f"use LAYER:UNIT, e.g. 'logits:{found[0]}'"
            )
        every = {_normalize(a): i for i in range(len(self)) for a in self._candidates(i)}
        close = difflib.get_close_matches(_normalize(name), list(every), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise MfvError(f"no class of this model is called {name!r}{hint}")


def imagenet_classes() -> ClassNames:
    """The 1000 ImageNet-1k classes (shipped with mfv, so no network is needed)."""
    text = resources.files("mfv").joinpath("data/imagenet_classes.json").read_text("utf-8")
    rows = json.loads(text)
    return ClassNames(
        names=tuple(r[1][0] for r in rows),
        wnids=tuple(r[0] for r in rows),
        aliases=tuple(tuple(r[1][1:]) for r in rows),
    )

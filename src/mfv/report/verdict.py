"""Per target and recipe, one line that says whether MFV's facet pictures beat random starts.

Computed from evaluate's metrics only: coverage of the target's classes (by the independent
networks when there are any), fidelity (how many pictures stay in their facet), activation
(mean over facets, in units of the best photo's) and diversity, each against the random starts of
the same recipe. The summary names what MFV wins and what it loses, so a loss reads as one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mfv.results.metrics import METRICS, finite_number, format_value, number
from mfv.results.model import TargetResult

ACTIVATION_TOL = 0.02  # relative: closer than this counts as a tie
DIVERSITY_TOL = 1.05  # a ratio within [1/x, x] counts as a tie
FAR = 100.0  # from this ratio on, the diversities are given instead of their ratio


@dataclass(frozen=True)
class Clause:
    criterion: str  # "coverage", "fidelity", "activation" or "diversity"
    text: str
    outcome: str  # "better", "worse", "even" (against random starts) or "info" (no comparison)


@dataclass(frozen=True)
class Verdict:
    recipe: str
    clauses: tuple[Clause, ...]

    def _names(self, outcome: str) -> list[str]:
        return [c.criterion for c in self.clauses if c.outcome == outcome]

    @property
    def outcome(self) -> str:
        """"better", "worse", "mixed", "even", or "alone" (nothing to compare with)."""
        better, worse, even = self._names("better"), self._names("worse"), self._names("even")
        if not (better or worse or even):
            return "alone"
        if better and worse:
            return "mixed"
        return "better" if better else ("worse" if worse else "even")

    @property
    def summary(self) -> str:
        better, worse, even = self._names("better"), self._names("worse"), self._names("even")
        if self.outcome == "alone":
            return "has no random starts to compare with"
        if self.outcome == "even":
            return "does no better than random starts"
        text = ""
        if better:
            text = f"beats random starts on {_join(better)}"
        if worse:
            text += (" but loses on " if better else "loses to random starts on ") + _join(worse)
        if even:
            text += f", ties on {_join(even)}"
        return text

    @property
    def text(self) -> str:
        clauses = "; ".join(c.text for c in self.clauses)
        return f"MFV ({self.recipe}) {self.summary}" + (f": {clauses}" if clauses else "")


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _compare(mfv: float, random: float, tol: float) -> str:
    if abs(mfv - random) <= tol * max(abs(mfv), abs(random)):
        return "even"
    return "better" if mfv > random else "worse"


def n_classes(target: TargetResult) -> int | None:
    """How many classes a target's coverage counts: 1 for a class logit, else its positively
    weighted terms (coverage exists only when all terms are logits)."""
    if target.class_index is not None:
        return 1
    terms = target.target.get("terms") or []
    positive = [t for t in terms
                if isinstance(t, Mapping) and (finite_number(t.get("weight")) or 0) > 0]
    return len(positive) or None


def _classes(share: float, n: int | None) -> str:
    if n and abs(share * n - round(share * n)) < 1e-6:
        return f"{round(share * n)}/{n}"
    return format_value(share, "share") + (f" of {n}" if n else "")


def _coverage(mfv: Any, random: Any, own: str | None, n: int | None) -> Clause | None:
    if not isinstance(mfv, Mapping) or not mfv:
        return None
    random = random if isinstance(random, Mapping) else {}
    others = [k for k in mfv if k != own]
    nets = others or list(mfv)
    m = METRICS["coverage"].combine(mfv[k] for k in nets)
    if m is None:
        return None
    noun = "class" if n == 1 else "classes"
    who = (f"judged by {len(nets)} other network{'s' if len(nets) != 1 else ''}" if others
           else f"judged by {nets[0]}")
    r = METRICS["coverage"].combine(random[k] for k in nets if k in random)
    if r is None:
        return Clause("coverage", f"covers {_classes(m, n)} {noun}, {who}", "info")
    return Clause("coverage", f"covers {_classes(m, n)} {noun} vs {_classes(r, n)} from random "
                  f"starts, {who}", _compare(m, r, 1e-9))


def _fidelity(values: Sequence[Any]) -> Clause | None:
    known = [bool(v) for v in values if isinstance(v, bool)]
    if not known:
        return None
    share = METRICS["fidelity"].combine(known)
    return Clause("fidelity", f"{sum(known)}/{len(known)} pictures stay in their facet "
                  f"(fidelity {format_value(share, 'share')})", "info")


def _activation(ratios: Sequence[Any], values: Sequence[Any], random: Mapping[str, Any]
                ) -> Clause | None:
    m = METRICS["activation_ratio"].combine(ratios)
    r = finite_number(random.get("activation_ratio"))
    if m is not None:
        if r is None:
            return Clause("activation", f"{format_value(m, 'ratio')} the best photo", "info")
        return Clause("activation", f"{format_value(m, 'ratio')} the best photo vs "
                      f"{format_value(r, 'ratio')} from random starts",
                      _compare(m, r, ACTIVATION_TOL))
    m, r = METRICS["activation"].combine(values), finite_number(random.get("activation"))
    if m is None:
        return None
    if r is None:
        return Clause("activation", f"activation {number(m)}", "info")
    return Clause("activation", f"activation {number(m)} vs {number(r)} from random starts",
                  _compare(m, r, ACTIVATION_TOL))


def _diversity(mfv: Any, random: Any) -> Clause | None:
    m, r = finite_number(mfv), finite_number(random)
    if m is None:
        return None
    if r is None:
        return Clause("diversity", f"diversity {number(m, 2)}", "info")
    values = f"({number(m, 2)} vs {number(r, 2)})"
    if r <= 0:
        if m <= 0:
            return Clause("diversity", "as diverse as random starts (both 0)", "even")
        return Clause("diversity", f"more diverse than random starts {values}", "better")
    ratio = m / r
    if ratio >= DIVERSITY_TOL:
        text = (f"far more diverse than random starts {values}" if ratio >= FAR
                else f"{number(ratio, 2)}× more diverse than random starts")
        return Clause("diversity", text, "better")
    if ratio <= 1 / DIVERSITY_TOL:
        text = (f"far less diverse than random starts {values}" if 1 / ratio >= FAR
                else f"{number(1 / ratio, 2)}× less diverse than random starts")
        return Clause("diversity", text, "worse")
    return Clause("diversity", f"as diverse as random starts {values}", "even")


def verdicts(target: TargetResult | Mapping[str, Any], model_name: str | None = None
             ) -> list[Verdict]:
    """One verdict per recipe that has facet pictures with metrics."""
    if not isinstance(target, TargetResult):
        target = TargetResult.model_validate(target)
    n = n_classes(target)
    out = []
    for recipe in target.recipes:
        pics = target.picture_metrics(recipe)
        mfv = target.metrics.facet.get(recipe, {})
        random = target.metrics.random.get(recipe, {})
        clauses = [
            _coverage(mfv.get("coverage"), random.get("coverage"), model_name, n),
            _fidelity([p.get("fidelity") for p in pics]),
            _activation([p.get("activation_ratio") for p in pics],
                        [p.get("activation") for p in pics], random),
            _diversity(mfv.get("diversity"), random.get("diversity")),
        ]
        kept = tuple(c for c in clauses if c is not None)
        if kept:
            out.append(Verdict(recipe, kept))
    return out

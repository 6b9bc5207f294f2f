"""The Machine Interpretability Score (MIS): would an observer learn the unit from its references?

The two-alternative task of Borowski et al. (ICLR 2021), automated by Zimmermann, Klindt &
Brendel (NeurIPS 2024, "Measuring per-unit interpretability at scale without humans"). Per
unit, N = 20 trials; in trial t an observer sees K = 9 references of what drives the unit (E⁺)
and K of what it shuns (E⁻), and two query photos, one of the most activating (q⁺) and one of
the least (q⁻). It embeds every image, s(q, E) is the mean cosine similarity of a query to a
reference set, and the trial is right when

    Δ = [s(q⁺, E⁺) − s(q⁺, E⁻)] − [s(q⁻, E⁺) − s(q⁻, E⁻)] > 0.

The score is the share of right trials (0.5 = chance). The ranks are IMI's (appendix A.2):
queries are the N most (least) activating images, trial t's references those at ranks
N + N·k + t, k = 0..K−1 (20 + 20k + t for N = 20), from the top (bottom).

`ALPHA` is the published code's default α of σ(αΔ) (klindtlab/MachInterp, `calc_MIS_set`),
which the authors fitted to human responses (IMI) with DreamSim as the observer; we cannot
reach those data nor that observer, so σ(αΔ) is reported beside the share of right trials, not
instead of it.

Pure numpy: the functions take embeddings and rank orders, so synthetic data test them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mfv.core.errors import MfvError

N_TRIALS = 20
N_REFERENCES = 9
ALPHA = 0.16  # MachInterp's `calc_MIS_set(alpha=0.16)`: fitted on human data (DreamSim observer)


@dataclass(frozen=True)
class Trials:
    """Which images a task uses, as indices into an embedding table: per trial a positive and
    a negative query, and K positive and K negative references."""

    query_pos: np.ndarray  # (N,)
    query_neg: np.ndarray  # (N,)
    refs_pos: np.ndarray  # (N, K)
    refs_neg: np.ndarray  # (N, K)

    @property
    def n_trials(self) -> int:
        return len(self.query_pos)

    @property
    def n_references(self) -> int:
        return self.refs_pos.shape[1]

    def images(self) -> np.ndarray:
        """Every index the task uses, once, sorted."""
        return np.unique(np.concatenate([self.query_pos, self.query_neg,
                                         self.refs_pos.ravel(), self.refs_neg.ravel()]))


def trial_ranks(n_trials: int = N_TRIALS, n_references: int = N_REFERENCES
                ) -> tuple[np.ndarray, np.ndarray]:
    """(N,) query ranks 0..N−1 and (N, K) reference ranks N + N·k + t (0 = the extreme image)."""
    t = np.arange(n_trials)
    k = np.arange(n_references)
    return t, n_trials + n_trials * k[None, :] + t[:, None]


def needed(n_trials: int = N_TRIALS, n_references: int = N_REFERENCES) -> int:
    """Images a side needs: N queries and N·K references (200 for the published task)."""
    return n_trials * (n_references + 1)


def fitting_references(n_ranked: int, n_trials: int = N_TRIALS,
                       n_references: int = N_REFERENCES) -> int:
    """The largest K ≤ `n_references` for which both sides fit, apart, in `n_ranked` images
    (0 when not even one reference each does)."""
    return max(0, min(n_references, n_ranked // (2 * n_trials) - 1))


def too_few(n_ranked: int) -> str:
    """Why a target gets no MIS (fewer photos than one reference per side needs)."""
    return (f"the task needs at least {2 * needed(N_TRIALS, 1)} ranked photos, the scan has "
            f"{n_ranked}")


def ranked(activations: np.ndarray) -> np.ndarray:
    """Indices of the images with a finite activation, most activating first (ties kept in
    index order, so the ranking is reproducible)."""
    values = np.asarray(activations, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(values))
    return finite[np.argsort(-values[finite], kind="stable")]


def natural_trials(order: np.ndarray, n_trials: int = N_TRIALS,
                   n_references: int = N_REFERENCES) -> Trials:
    """The published task over a ranking (`ranked`, most activating first): the top of `order`
    gives the positive side, its bottom the negative one, the two sides apart."""
    order = np.asarray(order)
    if 2 * needed(n_trials, n_references) > len(order):
        raise MfvError(f"the MIS task with {n_trials} trials and {n_references} references "
                       f"needs {2 * needed(n_trials, n_references)} ranked images, "
                       f"{len(order)} given")
    q, r = trial_ranks(n_trials, n_references)
    bottom = order[::-1]
    return Trials(order[q], bottom[q], order[r], bottom[r])


def with_references(trials: Trials, pos: np.ndarray | None, neg: np.ndarray | None) -> Trials:
    """The same queries with other references: `pos` / `neg` are indices of pictures (in the
    same table) shown in *every* trial (a unit has fewer pictures than trials); None keeps
    the natural references of that side."""
    n = trials.n_trials

    def every_trial(indices: np.ndarray | None, natural: np.ndarray) -> np.ndarray:
        if indices is None:
            return natural
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or not len(indices):
            raise MfvError("synthetic references must be a non-empty list of pictures")
        return np.broadcast_to(indices, (n, len(indices)))

    return Trials(trials.query_pos, trials.query_neg, every_trial(pos, trials.refs_pos),
                  every_trial(neg, trials.refs_neg))


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def similarity(queries: np.ndarray, references: np.ndarray) -> np.ndarray:
    """s(q, E): per trial, the mean cosine similarity of its query (N, D) to its references
    (N, K, D); (N,)."""
    return np.einsum("nd,nkd->nk", _unit(queries), _unit(references)).mean(axis=1)


def deltas(embeddings: np.ndarray, trials: Trials) -> np.ndarray:
    """Δ of every trial, (N,): above 0 = the observer picks the right query."""
    e = np.asarray(embeddings)
    qp, qn = e[trials.query_pos], e[trials.query_neg]
    ep, en = e[trials.refs_pos], e[trials.refs_neg]
    return (similarity(qp, ep) - similarity(qp, en)) - (similarity(qn, ep) - similarity(qn, en))


def score(delta: np.ndarray) -> float:
    """The share of right trials (Δ > 0; a tie counts as wrong, as published)."""
    return float(np.mean(np.asarray(delta) > 0))


def soft_score(delta: np.ndarray, alpha: float = ALPHA) -> float:
    """The mean of σ(αΔ): the published map from Δ to a human's expected accuracy."""
    return float(np.mean(1.0 / (1.0 + np.exp(-alpha * np.asarray(delta, dtype=np.float64)))))


def evaluate(embeddings: np.ndarray, trials: Trials, alpha: float = ALPHA) -> dict[str, float]:
    """The score of one condition: `mis` (share of right trials), `mis_soft` (σ(αΔ)),
    `mis_delta` (mean Δ)."""
    d = deltas(embeddings, trials)
    return {"mis": score(d), "mis_soft": soft_score(d, alpha), "mis_delta": float(np.mean(d))}


AS_MUCH = 0.9  # synthetic references teach "as much" from this share of the natural score on


def verdict(natural: float | None, facet: float | None, random: float | None = None,
            recipe: str = "") -> str:
    """One line: do the facet pictures teach the observer as much as the photos?"""
    if natural is None or facet is None:
        return "no MIS: the task needs both natural and facet references"
    name = f"the {recipe} facet pictures" if recipe else "the facet pictures"
    if facet >= natural:
        text = f"{name} teach as much as the photos ({facet:.2f} vs {natural:.2f})"
    elif facet >= AS_MUCH * natural:
        text = (f"{name} teach nearly as much as the photos ({facet:.2f} vs {natural:.2f}, "
                f"≥ {AS_MUCH:.0%} of it)")
    else:
        text = f"{name} teach less than the photos ({facet:.2f} vs {natural:.2f})"
    if random is not None:
        word = "above" if facet > random else ("level with" if facet == random else "below")
        text += f"; {word} random starts ({random:.2f})"
    if natural <= 0.6:
        text += "; the photos themselves barely teach this observer the unit"
    return text

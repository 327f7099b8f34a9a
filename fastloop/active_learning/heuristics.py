"""Acquisition heuristics: one informativeness score per sample from Monte-Carlo probabilities.

Every heuristic takes probabilities shaped ``[N, C, iterations]`` (BaaL's layout: samples,
classes, MC passes; ``[N, C]`` counts as one pass) and returns a float tensor ``[N]`` where
**higher always means more informative**, so a query labels the top scores. Heuristics that are
"lower is better" in their usual form (margin, confidence) are flipped here, which is where
Flash's loop went wrong (it took the highest score for every BaaL heuristic).

``resolve_heuristic`` accepts a name of this module's heuristics, any callable with the same
contract, or a BaaL heuristic object (``get_uncertainties`` plus ``reversed``), when ``baal`` is
installed.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch
from torch import Tensor

Heuristic = Callable[[Tensor], Tensor]


def _as_mc(probabilities: Tensor, name: str) -> Tensor:
    if not isinstance(probabilities, Tensor):
        raise TypeError(f"heuristic {name!r} takes a torch.Tensor of probabilities, got {type(probabilities).__name__}")
    if probabilities.ndim == 2:
        probabilities = probabilities.unsqueeze(-1)
    if probabilities.ndim != 3:
        raise ValueError(
            f"heuristic {name!r} takes probabilities shaped [N, C, iterations] (or [N, C]), "
            f"got shape {tuple(probabilities.shape)}"
        )
    return probabilities.double()  # scores of near-equal samples should not tie by rounding


def _entropy(p: Tensor, dim: int) -> Tensor:
    # xlogy(0, 0) == 0: a class with probability 0 adds nothing.
    return -torch.special.xlogy(p, p).sum(dim)


def entropy(probabilities: Tensor) -> Tensor:
    """Predictive entropy ``H(mean_t p_t)``: high when the averaged prediction is spread out."""
    p = _as_mc(probabilities, "entropy")
    return _entropy(p.mean(-1), dim=1)


def bald(probabilities: Tensor) -> Tensor:
    """BALD, the mutual information between label and weights:
    ``H(mean_t p_t) - mean_t H(p_t)``. High when the passes disagree with each other."""
    p = _as_mc(probabilities, "bald")
    return _entropy(p.mean(-1), dim=1) - _entropy(p, dim=1).mean(-1)


def margin(probabilities: Tensor) -> Tensor:
    """``1 - (p_top1 - p_top2)`` of the averaged prediction: 1 when the two best classes tie."""
    p = _as_mc(probabilities, "margin").mean(-1)
    if p.shape[1] < 2:
        raise ValueError(f"heuristic 'margin' needs at least 2 classes, got {p.shape[1]}")
    top2 = p.topk(2, dim=1).values
    return 1 - (top2[:, 0] - top2[:, 1])


def least_confidence(probabilities: Tensor) -> Tensor:
    """``1 - max_c p_c`` of the averaged prediction: high when no class is confident."""
    p = _as_mc(probabilities, "least_confidence").mean(-1)
    return 1 - p.max(dim=1).values


def random(probabilities: Tensor) -> Tensor:
    """Uniform random scores from torch's global generator (seeded runs repeat; a resumed run
    continues the stream from the checkpoint's RNG state)."""
    p = _as_mc(probabilities, "random")
    return torch.rand(p.shape[0], dtype=torch.float64)


HEURISTICS: Dict[str, Heuristic] = {
    "bald": bald, "entropy": entropy, "margin": margin, "least_confidence": least_confidence, "random": random,
}


class _BaalHeuristic:
    """A BaaL heuristic object behind this module's contract (BaaL's ``reversed=False`` means
    lower is better: those scores are negated)."""

    def __init__(self, heuristic: Any) -> None:
        self.heuristic = heuristic
        self.__name__ = type(heuristic).__name__

    def __call__(self, probabilities: Tensor) -> Tensor:
        scores = torch.as_tensor(self.heuristic.get_uncertainties(probabilities.detach().cpu().numpy()))
        scores = scores.reshape(-1).double()
        return scores if getattr(self.heuristic, "reversed", True) else -scores


def resolve_heuristic(heuristic: Any) -> Heuristic:
    """A callable ``probabilities [N, C, T] -> scores [N]`` (higher: more informative)."""
    if isinstance(heuristic, str):
        if heuristic not in HEURISTICS:
            raise ValueError(f"unknown heuristic {heuristic!r}; choose one of {', '.join(HEURISTICS)} or pass a callable")
        return HEURISTICS[heuristic]
    if callable(getattr(heuristic, "get_uncertainties", None)):
        return _BaalHeuristic(heuristic)
    if callable(heuristic):
        return heuristic
    raise TypeError(
        f"heuristic must be a name ({', '.join(HEURISTICS)}), a callable or a BaaL heuristic, "
        f"got {type(heuristic).__name__}"
    )


def heuristic_name(heuristic: Heuristic) -> str:
    return getattr(heuristic, "__name__", type(heuristic).__name__)


def score(heuristic: Heuristic, probabilities: Tensor) -> Tensor:
    """Call ``heuristic`` and check its answer: one finite score per sample."""
    name = heuristic_name(heuristic)
    scores = heuristic(probabilities)
    if not isinstance(scores, Tensor):
        scores = torch.as_tensor(scores)
    scores = scores.detach().cpu().reshape(-1) if scores.ndim > 1 and scores.shape[1:].numel() == 1 else scores.cpu()
    if scores.shape != (probabilities.shape[0],):
        raise ValueError(
            f"heuristic {name!r} returned scores shaped {tuple(scores.shape)}; expected one per sample "
            f"({probabilities.shape[0]},)"
        )
    if not bool(torch.isfinite(scores).all()):  # host sync: once per query, on CPU scores
        raise ValueError(f"heuristic {name!r} returned non-finite scores (nan or inf)")
    return scores.double()


def top_k(scores: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` highest scores; ties go to the earlier position (stable)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]

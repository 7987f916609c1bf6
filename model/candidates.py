"""Closed-set questions: a question with the answers it may take, ranked by the model's likelihood (model.ranking).

Torch-free, so the job spec can check candidates before anything heavy is imported. The settings are documented in
the README's job-spec table ([questions.NAME] candidates, scoring; [run] max_candidates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SCORINGS = ("sum", "mean")  # total log-probability of the candidate's tokens and eos, or its mean per token
DEFAULT_SCORING = "sum"
DEFAULT_MAX_CANDIDATES = 256


@dataclass(frozen=True)
class ClosedSet:
    """The answers a question may take, in the order the output's candidate_logprobs lists them, and how a
    candidate's token log-probabilities make its score."""

    candidates: tuple[str, ...]
    scoring: str = DEFAULT_SCORING

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))

    def to_dict(self) -> dict[str, object]:
        return {"candidates": list(self.candidates), "scoring": self.scoring}


def candidates_problem(candidates: object, limit: int = DEFAULT_MAX_CANDIDATES) -> str | None:
    """Why `candidates` cannot be a question's answer set (None when it can): not a list of non-blank strings, fewer
    than two, duplicates, or more than `limit`."""
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        return f"expected an array of strings, got {type(candidates).__name__}"
    if not candidates:
        return "empty; give at least two candidate answers"
    for position, candidate in enumerate(candidates):
        if not isinstance(candidate, str):
            return f"candidate {position + 1} is not a string ({candidate!r}); quote it"
        if not candidate.strip():
            return f"candidate {position + 1} is blank; every candidate must have some text"
    if len(candidates) == 1:
        return f"only one candidate ({candidates[0]!r}): ranking needs at least two"
    seen: set[str] = set()
    for candidate in candidates:
        if candidate in seen:
            return f"{candidate!r} is listed more than once; list each candidate once"
        seen.add(candidate)
    if len(candidates) > limit:
        return f"{len(candidates)} candidates, more than the limit of {limit}; raise [run] max_candidates to allow it"
    return None


def scoring_problem(scoring: object) -> str | None:
    if scoring not in SCORINGS:
        return f"expected one of {', '.join(repr(s) for s in SCORINGS)}, got {scoring!r}"
    return None


def closed_set(
    candidates: Sequence[str], scoring: str = DEFAULT_SCORING, limit: int = DEFAULT_MAX_CANDIDATES
) -> ClosedSet:
    """A checked ClosedSet; ValueError says what is wrong."""
    problem = candidates_problem(candidates, limit) or scoring_problem(scoring)
    if problem:
        raise ValueError(problem)
    return ClosedSet(tuple(candidates), scoring)


def as_ranked(scores: Sequence[float]) -> tuple[int, list[float]]:
    """(index of the best candidate, each candidate's probability among them: softmax of `scores`)."""
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return max(range(len(scores)), key=scores.__getitem__), [w / total for w in weights]

"""Bad-input handling shared by the manifest validator, the processors, the datasets and the collator.

Every problem is a :class:`DataError` that names the sample, the modality (column) and what to do about it.
Callers choose a policy (``on_error``):

* ``"skip_modality"`` (the default everywhere in the library): an unreadable modality of a sample is dropped (the
  sample goes on without it, as with any missing modality) and counted; a sample left with no modality is skipped
  and counted. Missing modalities are the norm in a cohort, so one bad image does not cost the sample its note.
* ``"skip_sample"`` (``"skip"`` is accepted as its old name): the whole sample is dropped and counted.
* ``"raise"``: the :class:`DataError` is raised.

Counts are kept per ``(modality, reason)`` in a :class:`SkipReport`, which is logged at the end. Nothing is
dropped silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("skip_modality", "skip_sample", "raise", "skip")
DEFAULT_ON_ERROR = "skip_modality"
_ALIASES = {"skip": "skip_sample"}


class DataError(ValueError):
    """A sample that cannot be used as is.

    Args:
        reason: short machine-readable reason (used to count skips), e.g. ``"empty_text"``.
        message: what is wrong, for a person.
        sample_id: the sample's id (``None`` when not known, e.g. while fitting).
        modality: the modality (manifest column) concerned.
        fix: what the user should do.
    """

    def __init__(
        self, reason: str, message: str, *, sample_id: str | None = None, modality: str | None = None, fix: str = ""
    ):
        self.reason = reason
        self.message = message
        self.sample_id = sample_id
        self.modality = modality
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.sample_id is not None:
            where.append(f"sample {self.sample_id!r}")
        if self.modality is not None:
            where.append(f"modality {self.modality!r}")
        text = (", ".join(where) + ": " if where else "") + self.message
        if self.fix:
            text += f" Fix: {self.fix}"
        return text

    def located(self, *, sample_id: str | None = None, modality: str | None = None) -> DataError:
        """A copy that also names the sample/modality (keeps what is already known)."""
        return DataError(
            self.reason,
            self.message,
            sample_id=self.sample_id if self.sample_id is not None else sample_id,
            modality=self.modality if self.modality is not None else modality,
            fix=self.fix,
        )

    def __reduce__(self):  # picklable across `datasets.map` worker processes
        return (_rebuild_data_error, (self.reason, self.message, self.sample_id, self.modality, self.fix))


def _rebuild_data_error(reason, message, sample_id, modality, fix):
    return DataError(reason, message, sample_id=sample_id, modality=modality, fix=fix)


def check_on_error(on_error: str) -> str:
    """The canonical policy name (``"skip"`` -> ``"skip_sample"``); ``ValueError`` for anything else."""
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(
            f"on_error must be one of {ON_ERROR_CHOICES} ('skip' is the old name of 'skip_sample'), got {on_error!r}"
        )
    return _ALIASES.get(on_error, on_error)


SAMPLE, MODALITY = "sample", "modality"


@dataclass
class SkipReport:
    """What was skipped, per ``(modality, reason)`` with a few example messages each, in two scopes:
    ``counts`` holds samples dropped whole, ``modality_counts`` modality values dropped while their sample was kept
    (``on_error="skip_modality"``, or a training value left out of processor fitting).

    An error that names its sample counts once per ``(scope, modality, reason, sample)``: a training loop meets a
    bad sample every epoch, and it is still one sample (``seen`` holds those keys; merged reports count their
    union). Errors without a sample id (processor fitting) count every time."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    modality_counts: Counter = field(default_factory=Counter)
    modality_examples: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    max_examples: int = 3
    seen: set = field(default_factory=set)

    def add(self, error: DataError, scope: str = SAMPLE) -> bool:
        """Count ``error``: ``scope="sample"`` (the sample was dropped) or ``"modality"`` (only its modality).
        Returns ``False`` when this sample was already counted for the same modality and reason (nothing added)."""
        if scope not in (SAMPLE, MODALITY):
            raise ValueError(f"scope must be {SAMPLE!r} or {MODALITY!r}, got {scope!r}")
        counts, examples = (self.counts, self.examples) if scope == SAMPLE else self._modality_scope()
        key = (error.modality or "-", error.reason)
        if error.sample_id is not None:
            if (scope, *key, str(error.sample_id)) in self.seen:
                return False
            self.seen.add((scope, *key, str(error.sample_id)))
        counts[key] += 1
        ex = examples.setdefault(key, [])
        if len(ex) < self.max_examples:
            ex.append(str(error))
        return True

    def _modality_scope(self):
        return self.modality_counts, self.modality_examples

    def update(self, other: SkipReport) -> None:
        """Add another report's counts (and examples) to this one; a sample both counted counts once."""
        both = Counter((scope, modality, reason) for scope, modality, reason, _ in self.seen & other.seen)
        for scope, mine, theirs in (
            (SAMPLE, (self.counts, self.examples), (other.counts, other.examples)),
            (MODALITY, self._modality_scope(), other._modality_scope()),
        ):
            for key, c in theirs[0].items():
                mine[0][key] += c - both[(scope, *key)]
                ex = mine[1].setdefault(key, [])
                ex.extend(e for e in theirs[1].get(key, []) if e not in ex)
                del ex[self.max_examples :]
        self.seen |= other.seen

    @property
    def total(self) -> int:
        """Samples dropped whole."""
        return sum(self.counts.values())

    @property
    def modality_total(self) -> int:
        """Modality values dropped while their samples were kept."""
        return sum(self.modality_counts.values())

    def as_dict(self) -> dict:
        def rows(counts, examples):
            return [
                {"modality": m, "reason": r, "count": c, "examples": examples.get((m, r), [])}
                for (m, r), c in sorted(counts.items())
            ]

        return {
            "total": self.total,
            "by_reason": rows(self.counts, self.examples),
            "modality_total": self.modality_total,
            "modalities_by_reason": rows(self.modality_counts, self.modality_examples),
        }

    def summary(self) -> str:
        if not self.total and not self.modality_total:
            return "nothing skipped"
        lines = [f"skipped {self.total} sample(s); dropped {self.modality_total} modality value(s) of kept samples"]
        for scope, counts, examples in (
            ("sample", self.counts, self.examples),
            ("modality", self.modality_counts, self.modality_examples),
        ):
            for (m, r), c in sorted(counts.items()):
                lines.append(f"  {c:6d}  {scope:8s}  modality={m}  reason={r}  e.g. {examples[(m, r)][0]}")
        return "\n".join(lines)

    def short(self) -> str:
        """One line: the samples skipped and modality values dropped per modality and reason."""
        parts = [f"{c} sample(s) {m}/{r}" for (m, r), c in sorted(self.counts.items())]
        parts += [f"{c} {m} value(s) {r}" for (m, r), c in sorted(self.modality_counts.items())]
        return "; ".join(parts) or "nothing skipped"

    def log(self, what: str = "data") -> None:
        if self.total or self.modality_total:
            logger.warning("%s: %s", what, self.summary())
        else:
            logger.info("%s: nothing skipped", what)


@dataclass
class Problem:
    """One problem: ``row`` is the 0-based row number (``None`` for table-level problems)."""

    reason: str
    message: str
    fix: str
    row: int | None = None
    sample_id: str | None = None
    column: str | None = None

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.sample_id is not None:
            where.append(f"sample {self.sample_id!r}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return f"[{self.reason}] {', '.join(where) or 'manifest'}: {self.message} Fix: {self.fix}"

"""Bad-input handling shared by the manifest validator, the processors, the datasets and the collator.

Every problem is a :class:`DataError` that names the sample, the modality (column) and what to do about it.
Callers choose a policy: ``on_error="raise"`` (default) raises it; ``on_error="skip"`` drops the sample and
counts it per reason in a :class:`SkipReport`, which is logged at the end. Nothing is dropped silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("raise", "skip")


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
    if on_error not in ON_ERROR_CHOICES:
        raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
    return on_error


@dataclass
class SkipReport:
    """Counts of skipped samples per ``(modality, reason)``, with a few example messages each."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, error: DataError) -> None:
        key = (error.modality or "-", error.reason)
        self.counts[key] += 1
        ex = self.examples.setdefault(key, [])
        if len(ex) < self.max_examples:
            ex.append(str(error))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "by_reason": [
                {"modality": m, "reason": r, "count": c, "examples": self.examples.get((m, r), [])}
                for (m, r), c in sorted(self.counts.items())
            ],
        }

    def summary(self) -> str:
        if not self.total:
            return "no samples skipped"
        lines = [f"skipped {self.total} sample(s):"]
        for (m, r), c in sorted(self.counts.items()):
            lines.append(f"  {c:6d}  modality={m}  reason={r}  e.g. {self.examples[(m, r)][0]}")
        return "\n".join(lines)

    def log(self, what: str = "data") -> None:
        if self.total:
            logger.warning("%s: %s", what, self.summary())
        else:
            logger.info("%s: no samples skipped", what)


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

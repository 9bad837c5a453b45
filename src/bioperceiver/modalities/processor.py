"""Base class of the data-side processors (one per modality kind, in ``modalities/<kind>/processor.py``).

A processor turns one manifest cell into the arrays its modality embedder reads (see
``bioperceiver/modalities``), without the batch dimension. ``fit`` learns vocabularies and statistics from the
training split, ``save_pretrained``/``from_pretrained`` store them as JSON (plus files such as ``tokenizer.json``)
and ``model_settings`` says what the model's modality config needs (vocabulary sizes and the like).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..data.errors import DEFAULT_ON_ERROR, DataError, SkipReport, check_on_error

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG_NAME = "processor_config.json"
StatisticsQuery = Callable[[dict[str, Any]], dict[str, Any]]
FORMAT_VERSION = 1


class ModalityProcessor:
    """One modality's processor. Subclasses define a ``Settings`` dataclass, ``_fit``, ``_process`` and the
    fitted ``state`` (JSON-serialisable), and may override ``_save_files``/``_load_files`` for extra files.

    Args:
        name: the modality (manifest column) this processor serves; used in error messages.
        **settings: fields of the subclass's ``Settings`` dataclass.
    """

    kind: ClassVar[str] = ""
    Settings: ClassVar[type] = object
    # for kinds with :meth:`extend`: (the model-config size field, the embedder's embedding attribute) of the ids
    # ``extend`` counts as ``overlap`` -- the rows ``trained`` masks (e.g. omics: genes, ``gene_embeddings``)
    vocabulary_ids: ClassVar[tuple[str, str] | None] = None

    def __init__(self, name: str | None = None, **settings: Any):
        self.name = name or self.kind
        try:
            self.settings = self.Settings(**settings)
        except TypeError as err:
            valid = [f.name for f in dataclasses.fields(self.Settings)]
            raise ValueError(f"{self.kind} processor {self.name!r}: {err}; valid settings: {valid}") from None
        self.state: dict[str, Any] = {}
        self.counters: Counter = Counter()  # e.g. out-of-vocabulary genes/channels/features seen at call time

    # ---- to implement -------------------------------------------------------------------------------------------
    def _fit(self, values: list[Any], sample_ids: list[str], base_dir: Path | None) -> None:
        raise NotImplementedError

    def _process(self, value: Any, *, sample_id: str | None, base_dir: Path | None, train: bool, rng) -> dict:
        raise NotImplementedError

    def model_settings(self) -> dict[str, Any]:
        """Settings of this modality in ``BioPerceiverConfig.modalities`` implied by the processor (vocab sizes)."""
        return {"kind": self.kind}

    def card_notes(self) -> dict[str, str]:
        """``{setting: one line}`` a model card should show about this processor beyond its settings (e.g. the
        source and licence of an asset it carries); none by default."""
        return {}

    def _save_files(self, directory: Path) -> None:  # extra files beside processor_config.json
        pass

    def _load_files(self, directory: Path) -> None:
        pass

    @property
    def needs_fit(self) -> bool:
        return True

    # ---- public API ---------------------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return bool(self.state) or not self.needs_fit

    def fit(
        self,
        values: Iterable[Any],
        *,
        sample_ids: Iterable[str] | None = None,
        base_dir: str | os.PathLike | None = None,
        on_error: str = DEFAULT_ON_ERROR,
        report: SkipReport | None = None,
    ) -> ModalityProcessor:
        """Learn vocabularies/statistics from the (training) values of this modality; missing values are ignored.

        A value that cannot be read (a :class:`DataError` naming its sample) is, with ``on_error`` ``"skip_modality"``
        or ``"skip_sample"``, left out of the fit and counted in ``report`` (scope ``"modality"``, its reason);
        with ``"raise"`` the error is raised, naming the sample, this modality and the fix."""
        from ..data.manifest import is_missing

        on_error = check_on_error(on_error)

        vals, ids = [], []
        sample_ids = list(sample_ids) if sample_ids is not None else None
        for i, v in enumerate(values):
            if is_missing(v):
                continue
            vals.append(v)
            ids.append(sample_ids[i] if sample_ids is not None else f"#{i}")
        if not vals:
            raise DataError(
                "no_training_values",
                "no non-missing value to fit on",
                modality=self.name,
                fix="check that the training split has samples with this modality, or drop the modality",
            )
        base = Path(base_dir) if base_dir is not None else None

        def fit_once(vals, ids):
            self.state = {}
            self._fit(vals, ids, base)

        self.dropping_unreadable(fit_once, vals, ids, on_error=on_error, report=report)
        logger.info("fitted %s processor %r on %d values", self.kind, self.name, len(vals))
        return self

    def dropping_unreadable(
        self,
        attempt: Callable[[list[Any], list[str]], Any],
        vals: list[Any],
        ids: list[str],
        *,
        on_error: str,
        report: SkipReport | None = None,
        what: str = "fitting",
        aim: str = "to fit on",
    ) -> Any:
        """``attempt(vals, ids)`` (a fit, a vocabulary extension) with the training values' ``on_error``: a
        :class:`DataError` naming one of ``ids`` drops that value from ``vals``/``ids`` (in place), is counted in
        ``report`` (scope ``"modality"``) and logged as left out of ``what``, and ``attempt`` runs again (they are
        cheap next to a run, bad values rare; ``attempt`` must leave the processor as it was when it raises); with
        ``on_error="raise"``, or an error naming no listed sample, it is raised. Returns what ``attempt`` returns."""
        while True:
            try:
                return attempt(vals, ids)
            except DataError as err:
                err = err.located(modality=self.name)
                if on_error == "raise" or err.sample_id not in ids:
                    raise err from None
                j = ids.index(err.sample_id)
                del vals[j], ids[j]
                if report is not None:
                    report.add(err, scope="modality")
                logger.warning("left out of %s: %s", what, err)
                if not vals:
                    raise DataError(
                        "no_training_values",
                        f"no readable value {aim} (every training value was left out)",
                        modality=self.name,
                        fix="fix the files of this modality (bioperceiver-validate MANIFEST), or drop the modality",
                    ) from None

    # ---- vocabulary extension (finetuning on a cohort with new genes / features) --------------------------------
    def extend(
        self,
        values: Iterable[Any],
        sample_ids: Iterable[str] | None = None,
        base_dir: str | os.PathLike | None = None,
        trained: Sequence[bool] | None = None,
    ) -> dict[str, Any]:
        """Grow the fitted vocabulary with what ``values`` (a new cohort's training rows) bring, keeping every
        existing id, as tokenizers add tokens; returns counts (``added``, ``overlap``, ...). Kinds with a fitted
        vocabulary the model embeds (omics genes, tabular features) implement it, with the embedder's
        ``vocabulary_embeddings``. ``trained``: per existing id, whether pretraining trained its embedding row (the
        backbone's ``trained_vocabulary_rows.safetensors``); with it the report also has ``overlap_trained``, the
        overlapping entries whose rows were trained (the others are still at their random initialisation)."""
        raise NotImplementedError(f"the {self.kind} processor has no vocabulary extension")

    @staticmethod
    def _overlap_trained(overlapping_ids: Iterable[int], trained: Sequence[bool] | None) -> dict[str, int]:
        """``{"overlap_trained": n}``: how many of the overlapping vocabulary ids have a trained row in ``trained``
        (``{}`` without it). An id beyond the mask counts as untrained."""
        if trained is None:
            return {}
        mask = np.asarray(trained, dtype=bool)
        return {"overlap_trained": int(sum(1 for i in overlapping_ids if i < len(mask) and mask[i]))}

    @property
    def extensible(self) -> bool:
        """Whether this kind implements :meth:`extend`."""
        return type(self).extend is not ModalityProcessor.extend

    # ---- federated fitting: each site summarises its own values, the server fits from the merged summaries ------
    def _site_statistics(self, values: list[Any], sample_ids: list[str], base_dir: Path | None) -> dict[str, Any]:
        """This site's contribution to a federated fit: JSON-serialisable counts and sums, never raw values.
        Summaries of all sites are merged with :func:`sum_statistics` (numbers and lists add up, dicts merge by
        key), so they must be additive."""
        raise NotImplementedError(
            f"the {self.kind} processor has no federated fit: implement _site_statistics and _fit_from_statistics "
            "(see CONTRIBUTING.md, 'Adding a modality')"
        )

    def _fit_from_statistics(self, merged: dict[str, Any], query: StatisticsQuery) -> None:
        """Fill ``self.state`` from the merged summaries of all sites (equal to ``_fit`` on the pooled values).
        ``query(request)`` asks every site :meth:`_answer_query` and returns the merged answers (for what one pass of
        sums cannot give, e.g. exact quantiles by counting)."""
        raise NotImplementedError(f"the {self.kind} processor has no federated fit")

    def _answer_query(
        self, values: list[Any], sample_ids: list[str], base_dir: Path | None, request: dict[str, Any]
    ) -> dict[str, Any]:
        """A site's additive answer to a follow-up ``request`` of :meth:`_fit_from_statistics` (counts only)."""
        raise NotImplementedError(f"the {self.kind} processor asks no follow-up query")

    def _present(self, values: Iterable[Any], sample_ids: Iterable[str] | None) -> tuple[list[Any], list[str]]:
        from ..data.manifest import is_missing

        sample_ids = list(sample_ids) if sample_ids is not None else None
        vals, ids = [], []
        for i, v in enumerate(values):
            if not is_missing(v):
                vals.append(v)
                ids.append(sample_ids[i] if sample_ids is not None else f"#{i}")
        return vals, ids

    def site_statistics(
        self,
        values: Iterable[Any],
        *,
        sample_ids: Iterable[str] | None = None,
        base_dir: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """What one site sends for a federated fit of this processor (missing values ignored; a value that cannot be
        read raises a :class:`DataError` naming the sample, to be fixed at the site). An empty site sends ``{}``."""
        vals, ids = self._present(values, sample_ids)
        if not vals:
            return {}
        try:
            return self._site_statistics(vals, ids, Path(base_dir) if base_dir is not None else None)
        except DataError as err:
            raise err.located(modality=self.name) from None

    def answer_query(
        self,
        values: Iterable[Any],
        request: dict[str, Any],
        *,
        sample_ids: Iterable[str] | None = None,
        base_dir: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """One site's answer to a follow-up query of :meth:`fit_from_statistics`."""
        vals, ids = self._present(values, sample_ids)
        if not vals:
            return {}
        return self._answer_query(vals, ids, Path(base_dir) if base_dir is not None else None, request)

    def fit_from_statistics(self, merged: dict[str, Any], query: StatisticsQuery | None = None) -> ModalityProcessor:
        """Fit from the merged site summaries (:func:`sum_statistics` of every site's :meth:`site_statistics`)."""
        if not merged:
            raise DataError(
                "no_training_values",
                "no site has a non-missing value to fit on",
                modality=self.name,
                fix="check that some site's training split has this modality, or drop the modality",
            )

        def no_query(request):
            raise RuntimeError(f"the {self.kind} processor needs follow-up queries to the sites: pass query=")

        self.state = {}
        self._fit_from_statistics(merged, query or no_query)
        logger.info("fitted %s processor %r from site statistics", self.kind, self.name)
        return self

    def __call__(
        self,
        value: Any,
        *,
        sample_id: str | None = None,
        base_dir: str | os.PathLike | None = None,
        train: bool = False,
        rng: np.random.Generator | None = None,
    ) -> dict[str, np.ndarray | float]:
        """Process one cell into arrays (no batch dimension). Raises :class:`DataError` naming the sample."""
        if not self.is_fitted:
            raise RuntimeError(
                f"{self.kind} processor {self.name!r} is not fitted: call .fit(training values) or load one with "
                "from_pretrained"
            )
        try:
            return self._process(
                value,
                sample_id=sample_id,
                base_dir=Path(base_dir) if base_dir is not None else None,
                train=train,
                rng=rng if rng is not None else np.random.default_rng(),
            )
        except DataError as err:
            raise err.located(sample_id=sample_id, modality=self.name) from None

    def error(self, reason: str, message: str, fix: str = "") -> DataError:
        return DataError(reason, message, modality=self.name, fix=fix)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "name": self.name,
            "settings": dataclasses.asdict(self.settings),
            "state": self.state,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (PROCESSOR_CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True, default=_json_default) + "\n")
        os.replace(tmp, directory / PROCESSOR_CONFIG_NAME)
        self._save_files(directory)
        return directory

    @classmethod
    def from_dict(cls, data: dict[str, Any], directory: Path | None = None) -> ModalityProcessor:
        kind = data.get("kind")
        if cls is ModalityProcessor:
            from .registry import get_modality

            target = get_modality(kind).processor_class
        else:
            target = cls
        if target.kind != kind:
            raise ValueError(f"processor config is for kind {kind!r}, not {target.kind!r}")
        if data.get("format_version", 1) > FORMAT_VERSION:
            raise ValueError(
                f"processor {data.get('name')!r} was saved by a newer bioperceiver (format "
                f"{data['format_version']} > {FORMAT_VERSION}); upgrade bioperceiver"
            )
        proc = target(data.get("name"), **data.get("settings", {}))
        proc.state = copy.deepcopy(data.get("state", {}))
        if directory is not None:
            proc._load_files(directory)
        proc._on_load()
        return proc

    def _on_load(self) -> None:  # rebuild caches from state
        pass

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> ModalityProcessor:
        directory = Path(directory)
        path = directory / PROCESSOR_CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: not a saved processor directory")
        return cls.from_dict(json.loads(path.read_text()), directory)

    def report(self) -> dict[str, int]:
        """Counts of things seen at call time that were not turned into tokens (out-of-vocabulary etc.)."""
        return dict(self.counters)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, fitted={self.is_fitted}, settings={self.settings})"


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def check_finite(proc: ModalityProcessor, array: np.ndarray, what: str, fix: str) -> None:
    if array.size and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise proc.error("non_finite", f"{what} has {bad} NaN/inf value(s)", fix)


def sum_statistics(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Merge site summaries: numbers add, lists of numbers add element-wise, dicts merge key by key (recursively).

    >>> sum_statistics([{"n": 2, "genes": {"A": 1}}, {"n": 3, "genes": {"A": 2, "B": 1}}])
    {'n': 5, 'genes': {'A': 3, 'B': 1}}
    """
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key not in out:
                out[key] = sum_statistics([value]) if isinstance(value, dict) else copy.deepcopy(value)
            elif isinstance(value, dict):
                out[key] = sum_statistics([out[key], value])
            elif isinstance(value, list):
                if len(value) != len(out[key]):
                    raise ValueError(f"site statistics {key!r} have different lengths ({len(out[key])}, {len(value)})")
                out[key] = [a + b for a, b in zip(out[key], value)]
            else:
                out[key] = out[key] + value
    return out

"""``BioPerceiverProcessor``: the per-modality processors of one model, saved beside it."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..modalities.registry import get_modality
from .errors import DEFAULT_ON_ERROR, DataError, SkipReport, check_on_error
from .manifest import Manifest, is_missing

if TYPE_CHECKING:
    from ..modalities.processor import ModalityProcessor

logger = logging.getLogger(__name__)

PROCESSOR_INDEX = "bioperceiver_processor.json"
PROCESSORS_DIR = "processors"
SKIPPED_KEY = "__skipped__"  # errors of the modalities dropped from a sample under on_error="skip_modality"


SETTINGS_SECTIONS = ("processors", "embedders")
_PATH_SUFFIXES = ("_file", "_path", "_dir")


class ProcessorSettings(tuple):
    """``(processors, embedders)``: per-COLUMN processor settings and embedder overrides from a settings file
    (a 2-tuple, so ``settings, embedders = load_processor_settings(path)`` works).

    Entries are keyed by manifest column (``text_report``, ``signal_ecg``...), never by kind: nothing in a settings
    file applies to a column it does not name. :meth:`for_columns` keeps the entries of the columns a run has and
    reports the others.

    Attributes:
        source: the file read (``None`` for settings built in code).
        unknown_keys: top-level keys of a sectioned file other than ``processors``/``embedders`` (ignored, reported).
    """

    def __new__(cls, processors=None, embedders=None, *, source=None, unknown_keys=()):
        self = super().__new__(cls, (dict(processors or {}), dict(embedders or {})))
        self.source = None if source is None else Path(source)
        self.unknown_keys = list(unknown_keys)
        self.not_applied: list[str] = []  # set by for_columns: the entries it left out
        return self

    def __getnewargs_ex__(self):
        return (self[0], self[1]), {"source": self.source, "unknown_keys": self.unknown_keys}

    @property
    def processors(self) -> dict[str, dict]:
        return self[0]

    @property
    def embedders(self) -> dict[str, dict]:
        return self[1]

    def unused(self, columns) -> list[str]:
        """Entries that would not be applied to a manifest with these modality ``columns``, as
        ``"section.key (why)"`` strings (empty when everything is used)."""
        columns = set(columns)
        out = [f"{k} (unknown section; expected {' or '.join(SETTINGS_SECTIONS)})" for k in self.unknown_keys]
        for section, entries in zip(SETTINGS_SECTIONS, self, strict=True):
            out += [f"{section}.{c} (no such modality column)" for c in entries if c not in columns]
        return out

    def for_columns(self, columns) -> ProcessorSettings:
        """The entries of ``columns`` only; every other entry is logged (one warning with the list) and listed in
        the result's ``not_applied`` attribute, so a script can show it."""
        columns = list(columns)
        unused = self.unused(columns)
        if unused:
            logger.warning(
                "processor settings%s: %d entr%s not used by this manifest (not applied to any column): %s",
                f" from {self.source}" if self.source else "",
                len(unused),
                "y" if len(unused) == 1 else "ies",
                "; ".join(unused),
            )
        out = ProcessorSettings(
            {c: v for c, v in self.processors.items() if c in columns},
            {c: v for c, v in self.embedders.items() if c in columns},
            source=self.source,
        )
        out.not_applied = unused
        return out


def load_processor_settings(path: str | os.PathLike | None) -> ProcessorSettings:
    """``(processor settings, embedder overrides)`` (a :class:`ProcessorSettings`) from a JSON/YAML file that is
    either ``{column: settings}`` or ``{processors: {column: settings}, embedders: {column: settings}}``; empty for
    ``None``.

    Keys are manifest columns; settings for columns a manifest lacks are reported, never applied to another column
    (:meth:`ProcessorSettings.for_columns`). Relative paths in the file (settings whose name ends in ``_file``,
    ``_path`` or ``_dir``, e.g. a text processor's ``tokenizer_file``) resolve against the settings file's own
    folder, wherever the run starts from."""
    if path is None:
        return ProcessorSettings()
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"processor settings file {path} does not exist; fix the path (or pass none)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping {{column: {{setting: value}}}}")
    unknown: list[str] = []
    if any(k in data for k in SETTINGS_SECTIONS):
        unknown = [k for k in data if k not in SETTINGS_SECTIONS]
        processors, embedders = dict(data.get("processors") or {}), dict(data.get("embedders") or {})
    else:
        processors, embedders = data, {}
    for section, entries in (("processors", processors), ("embedders", embedders)):
        for column, settings in entries.items():
            if not isinstance(settings, dict):
                raise ValueError(
                    f"{path}: {section}.{column} must be a mapping of settings for the column {column!r}, got "
                    f"{settings!r}"
                )
            entries[column] = {k: _resolve(v, k, path.parent) for k, v in settings.items()}
    return ProcessorSettings(processors, embedders, source=path, unknown_keys=unknown)


def same_setting(key: str, a: Any, b: Any) -> bool:
    """Whether two values of one processor setting mean the same: equal, or for a file setting (``..._file``) the
    same path written differently (relative / absolute) or a copy with the same bytes. Used wherever a run compares
    the settings it was given with those a saved processor was fitted with."""
    if a == b:
        return True
    if not key.endswith("_file") or not isinstance(a, str) or not isinstance(b, str):
        return False
    pa, pb = Path(a), Path(b)
    if not (pa.is_file() and pb.is_file()):
        return False
    from ..hashing import file_sha256

    return pa.resolve() == pb.resolve() or file_sha256(pa) == file_sha256(pb)


def _resolve(value: Any, key: str, folder: Path) -> Any:
    if isinstance(value, str) and key.endswith(_PATH_SUFFIXES) and value and not Path(value).is_absolute():
        return str(folder / value)
    return value


class BioPerceiverProcessor:
    """Processors by modality name (manifest column). ``save_pretrained(dir)`` writes
    ``bioperceiver_processor.json`` and ``processors/<name>/`` into ``dir`` — the model's directory, so a checkpoint
    carries its tokenizers.

    Args:
        processors: ``{modality name: ModalityProcessor}``.
    """

    def __init__(self, processors: Mapping[str, ModalityProcessor]):
        self.processors = dict(processors)
        for name, proc in self.processors.items():
            proc.name = name
        self.fit_report = SkipReport()  # training values left out of the last fit (see fit)
        self.unused_settings: list[str] = []  # settings entries from_manifest did not apply (no such column)

    @classmethod
    def from_manifest(
        cls, manifest: Manifest, settings: Mapping[str, Mapping[str, Any]] | None = None
    ) -> BioPerceiverProcessor:
        """Unfitted processors for every modality column of ``manifest``; ``settings`` gives per-column settings
        (a ``"kind"`` entry may be included and must match the column's kind). Settings for columns the manifest
        lacks are not applied to any column: they are logged as a warning and listed in the result's
        ``unused_settings``."""
        if isinstance(settings, ProcessorSettings):
            chosen = settings.for_columns(manifest.modalities)
            unused = chosen.not_applied
            settings = chosen.processors
        else:
            settings = dict(settings or {})
            unused = [f"processors.{c} (no such modality column)" for c in settings if c not in manifest.modalities]
            if unused:
                logger.warning(
                    "processor settings not used by this manifest (not applied to any column): %s", "; ".join(unused)
                )
        procs = {}
        for name, kind in manifest.modalities.items():
            s = dict(settings.get(name, {}))
            if s.pop("kind", kind) != kind:
                raise ValueError(f"processor settings for {name!r} name another kind than the manifest's {kind!r}")
            procs[name] = get_modality(kind).processor(name, **s)
        out = cls(procs)
        out.unused_settings = unused
        return out

    @property
    def modalities(self) -> dict[str, str]:
        return {name: p.kind for name, p in self.processors.items()}

    def fit(
        self, manifest: Manifest, split: str | None = "train", *, on_error: str = DEFAULT_ON_ERROR
    ) -> BioPerceiverProcessor:
        """Fit every processor on its column, using the ``split`` rows only (all rows when ``split`` is None or
        the manifest has no split column).

        With ``on_error`` ``"skip_modality"``/``"skip_sample"`` a training value that cannot be read is left out of
        its processor's fit (the other modalities of that sample still count for theirs) and counted in
        :attr:`fit_report` (per modality and reason, logged); with ``"raise"`` a :class:`DataError` names the
        sample, the modality and the fix."""
        on_error = check_on_error(on_error)
        table = manifest.table
        if split is not None and "split" in table:
            table = table[table["split"] == split]
            if table.empty:
                raise ValueError(f"the manifest has no {split!r} rows to fit the processors on")
        ids = table["sample_id"].tolist()
        self.fit_report = SkipReport()
        for name, proc in self.processors.items():
            if proc.is_fitted and not proc.needs_fit:
                continue
            proc.fit(
                table[name].tolist(),
                sample_ids=ids,
                base_dir=manifest.base_dir,
                on_error=on_error,
                report=self.fit_report,
            )
        self.fit_report.log("processor fitting")
        return self

    def extend(
        self,
        manifest: Manifest,
        split: str | None = "train",
        modalities: list[str] | None = None,
        trained: Mapping[str, Any] | None = None,
        *,
        on_error: str = DEFAULT_ON_ERROR,
    ) -> dict[str, dict[str, Any]]:
        """Extend the vocabulary of every extensible processor (:meth:`ModalityProcessor.extend`) with the
        ``split`` rows of ``manifest`` (a new cohort's training split); ``{modality: counts}`` of the extended ones
        (modalities restricted to ``modalities``; those with no value in the split are left as they are).
        ``trained``: ``{modality: per existing id, whether pretraining trained its embedding row}``; the counts of
        those modalities then include ``overlap_trained``. ``on_error`` treats a value that cannot be read as
        :meth:`fit` does: left out of the extension (counted in :attr:`fit_report`, logged) or, with ``"raise"``,
        raised."""
        on_error = check_on_error(on_error)
        table = manifest.table
        if split is not None and "split" in table:
            table = table[table["split"] == split]
        out, self.fit_report = {}, SkipReport()
        for name, proc in self.processors.items():
            if not proc.extensible or name not in table or (modalities is not None and name not in modalities):
                continue
            values, ids = table[name].tolist(), table["sample_id"].tolist()
            if all(is_missing(v) for v in values):
                continue
            mask = (trained or {}).get(name)
            extra = {} if mask is None else {"trained": mask}  # a plugin's extend without the argument still works

            def extend(vals, sample_ids, proc=proc, extra=extra):  # a failed extend leaves the processor as it was
                return proc.extend(vals, sample_ids=sample_ids, base_dir=manifest.base_dir, **extra)

            out[name] = proc.dropping_unreadable(
                extend,
                values,
                ids,
                on_error=on_error,
                report=self.fit_report,
                what="the vocabulary extension",
                aim="to extend the vocabulary with",
            )
        self.fit_report.log("vocabulary extension")
        return out

    def __call__(
        self,
        record: Mapping[str, Any],
        *,
        base_dir: str | os.PathLike | None = None,
        train: bool = False,
        rng: np.random.Generator | None = None,
        modalities: list[str] | None = None,
        on_error: str = "raise",
    ) -> dict[str, Any]:
        """Process one manifest row: ``{name: arrays or None}`` for each modality, plus ``sample_id``,
        ``patient_id`` and any ``label_*`` entries passed through. Raises :class:`DataError` naming the sample.

        ``on_error="skip_modality"``: a modality that fails is set to ``None`` (absent) and its error listed in
        ``out["__skipped__"]``; when no modality is left the :class:`DataError` raised (reason
        ``"no_readable_modality"``) carries those errors in ``.skipped``. Other values raise the first error (the
        caller then drops the whole sample under ``"skip_sample"``)."""
        on_error = check_on_error(on_error)
        sid = record.get("sample_id")
        out: dict[str, Any] = {"sample_id": sid, "patient_id": record.get("patient_id")}
        rng = rng if rng is not None else np.random.default_rng()
        present, skipped = 0, []
        for name, proc in self.processors.items():
            if modalities is not None and name not in modalities:
                out[name] = None
                continue
            value = record.get(name)
            if is_missing(value):
                out[name] = None
                continue
            try:
                out[name] = proc(value, sample_id=sid, base_dir=base_dir, train=train, rng=rng)
            except DataError as err:
                if on_error != "skip_modality":
                    raise
                out[name] = None
                skipped.append(err.located(sample_id=sid, modality=name))
                continue
            present += 1
        if not present:
            if skipped:
                err = DataError(
                    "no_readable_modality",
                    f"no modality of the sample could be read ({', '.join(e.reason for e in skipped)})",
                    sample_id=sid,
                    fix="fix the files named in the modality errors, or drop the row",
                )
                err.skipped = skipped
                raise err
            raise DataError(
                "no_modality",
                "the sample has no modality this processor handles",
                sample_id=sid,
                fix="drop the row or fill at least one modality column",
            )
        if skipped:
            out[SKIPPED_KEY] = skipped
        for key, value in record.items():
            if key.startswith("label_"):
                out[key] = value
        return out

    def process_many(
        self, records, *, base_dir=None, train: bool = False, seed: int = 0, on_error: str = DEFAULT_ON_ERROR
    ) -> tuple[list[dict], SkipReport]:
        """Process rows one by one; bad modalities (``"skip_modality"``) or samples (``"skip_sample"``) are left
        out and counted."""
        on_error = check_on_error(on_error)
        report, out = SkipReport(), []
        rng = np.random.default_rng(seed)
        for rec in records:
            try:
                sample = self(rec, base_dir=base_dir, train=train, rng=rng, on_error=on_error)
            except DataError as err:
                if on_error == "raise":
                    raise
                for e in getattr(err, "skipped", ()):
                    report.add(e, scope="modality")
                report.add(err)
                continue
            for e in sample.pop(SKIPPED_KEY, ()):
                report.add(e, scope="modality")
            out.append(sample)
        return out, report

    def model_modalities(self, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict]:
        """``BioPerceiverConfig.modalities`` entries implied by the fitted processors (vocab sizes, channels,
        spatial dims), updated with ``overrides`` (embedder settings such as ``patch_size``)."""
        unused = sorted(set(overrides or {}) - set(self.processors))
        if unused:
            logger.warning(
                "embedder settings for %s not used: no such modality among %s", unused, list(self.processors)
            )
        out = {}
        for name, proc in self.processors.items():
            cfg = proc.model_settings()
            cfg.update((overrides or {}).get(name, {}))
            out[name] = cfg
        return out

    def report(self) -> dict[str, dict[str, int]]:
        """Per modality, what was seen at call time but not tokenised (out-of-vocabulary genes, channels...)."""
        return {name: proc.report() for name, proc in self.processors.items() if proc.report()}

    def card_notes(self, modalities=None) -> dict[str, str]:
        """What each processor says about itself for a model card (``ModalityProcessor.card_notes``: e.g. the gene
        feature table's source and licence), keyed ``"<note> (<modality>)"``; ``modalities``: only those."""
        return {
            f"{key} ({name})": text
            for name, proc in self.processors.items()
            if modalities is None or name in modalities
            for key, text in proc.card_notes().items()
        }

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, proc in self.processors.items():
            proc.save_pretrained(directory / PROCESSORS_DIR / name)
        index = {"format_version": 1, "modalities": self.modalities}
        tmp = directory / (PROCESSOR_INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, directory / PROCESSOR_INDEX)
        return directory

    def fingerprint(self) -> str:
        """A SHA-256 of everything the processors compute with: what :meth:`save_pretrained` writes (each
        processor's settings and fitted state, and its files, e.g. a text tokenizer's vocabulary, which
        ``to_dict`` leaves out)."""
        import hashlib
        import tempfile

        digest = hashlib.sha256()
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            for path in sorted(p for p in Path(tmp).rglob("*") if p.is_file()):
                digest.update(path.relative_to(tmp).as_posix().encode() + b"\0")
                digest.update(path.read_bytes())
        return digest.hexdigest()

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> BioPerceiverProcessor:
        directory = Path(directory)
        index_path = directory / PROCESSOR_INDEX
        if not index_path.exists():
            raise FileNotFoundError(
                f"{index_path} not found: {directory} holds no BioPerceiver processors (fit them with "
                "tokenizers/fit_processors.py)"
            )
        from ..modalities.processor import ModalityProcessor

        index = json.loads(index_path.read_text())
        procs = {}
        for name, kind in index["modalities"].items():
            proc = ModalityProcessor.from_pretrained(directory / PROCESSORS_DIR / name)
            if proc.kind != kind:
                raise ValueError(f"{directory}: processor {name!r} is a {proc.kind!r} processor, index says {kind!r}")
            procs[name] = proc
        return cls(procs)

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}: {type(p).__name__}" for n, p in self.processors.items())
        return f"BioPerceiverProcessor({inner})"

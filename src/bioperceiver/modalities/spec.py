"""``ModalitySpec``: everything the library needs to know about one modality kind.

A kind is a folder ``bioperceiver/modalities/<kind>/`` with ``processor.py`` (data side: raw manifest cell ->
arrays), ``embedder.py`` (model side: arrays -> tokens) and ``spec.py``: a :class:`ModalitySpec` subclass whose
instance is registered once with :func:`bioperceiver.modalities.register_modality`. The collator, the manifest
validator, the ``datasets`` features, processor composition, config normalisation and attribution mapping only
ever ask the registered spec; none of them knows a kind by name.

The defaults here cover a kind whose processed sample is a set of 1-D arrays of one length (one token per entry,
like omics or tabular): declare ``arrays``, the three classes and the manifest ``cell_forms``, and the rest works.
Kinds with other layouts (images, multi-channel signals) override :meth:`ModalitySpec.collate`,
:meth:`ModalitySpec.num_tokens` and friends.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from ..data.errors import DataError, Problem

if TYPE_CHECKING:
    from .embedder import ModalityEmbedder
    from .processor import ModalityProcessor

CELL_FORMS = ("text", "mapping", "path")
_ARROW_DTYPES = {torch.long: "int64", torch.int64: "int64", torch.float32: "float32", torch.bool: "bool"}


@dataclass(frozen=True)
class ArraySpec:
    """One array of a processed sample (no batch dimension) and how it collates.

    Args:
        dtype: tensor dtype in the batch (also the Arrow dtype of ``build_dataset``).
        rank: dimensions without the batch; ``0`` = a scalar per sample (stacked to ``(B,)``); ``None`` = any rank
            (the kind's own :meth:`ModalitySpec.collate` handles it).
        pad_axes: axes padded to the longest sample of the batch (the default collate pads axis 0 of rank-1
            arrays: the token axis).
        pad_value: value written into padding (padding is masked out either way).
        required: a sample of this kind must hold the array; optional arrays absent from every sample of a batch
            are left out of it.
        doc: what the array holds, for people.
    """

    dtype: torch.dtype
    rank: int | None = 1
    pad_axes: tuple[int, ...] = (0,)
    pad_value: float = 0.0
    required: bool = True
    doc: str = ""


@dataclass(frozen=True)
class LinearInputs:
    """How a wide & deep head's linear term (``BioPerceiverConfig.head_linear_modalities``) reads a kind whose tokens
    are (id, standardised value) pairs: the id array and the config field holding the vocabulary size, and for
    kinds with categorical tokens the category-code array (0 = a numeric token) and its vocabulary size. The term
    has one coefficient per id (times the value) and one per category code."""

    id_key: str
    size_key: str
    category_key: str | None = None
    category_size_key: str | None = None

    @property
    def keys(self) -> tuple[str, ...]:
        """The arrays the term reads (besides the keep-mask)."""
        return (self.id_key, "values", *([self.category_key] if self.category_key else []))


class ModalitySpec:
    """The contract of one modality kind. Subclass it in ``modalities/<kind>/spec.py`` and register an instance.

    Class attributes:
        kind: the kind's name; manifest columns ``<kind>`` / ``<kind>_<suffix>`` are of this kind.
        processor_class: the :class:`~bioperceiver.modalities.ModalityProcessor` subclass (data side).
        embedder_class: the :class:`~bioperceiver.modalities.ModalityEmbedder` subclass (model side); its
            ``config_class`` dataclass holds the kind's entry of ``BioPerceiverConfig.modalities``.
        arrays: ``{key: ArraySpec}`` the processor emits per sample, the first key being the token axis.
        mask_key: key of the ``(B, L)`` keep-mask the default collate adds (or fills, when ``arrays`` declares it,
            e.g. text's ``attention_mask``).
        cell_forms: what a manifest cell may hold, among ``"text"`` (the value itself), ``"mapping"`` (a dict or
            its JSON string) and ``"path"`` (a file or folder, relative to the manifest, with ``#key=value``
            options).
        token_unit: what one token is, for people (word, patch, gene, channel patch, feature).
        default_processor_settings: processor settings used when the user gives none for a column.
        linear_inputs: a :class:`LinearInputs` when a wide & deep head's linear term can read the kind's tokens
            (``None``: it cannot).
    """

    kind: ClassVar[str] = ""
    processor_class: ClassVar[type[ModalityProcessor]]
    embedder_class: ClassVar[type[ModalityEmbedder]]
    arrays: ClassVar[Mapping[str, ArraySpec]] = MappingProxyType({})
    mask_key: ClassVar[str] = "mask"
    cell_forms: ClassVar[tuple[str, ...]] = ("path",)
    token_unit: ClassVar[str] = "token"
    default_processor_settings: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    linear_inputs: ClassVar[LinearInputs | None] = None

    # ---- classes ------------------------------------------------------------------------------------------------
    @property
    def config_class(self) -> type:
        """Dataclass of the kind's model settings (``BioPerceiverConfig.modalities[name]`` without ``kind``)."""
        return self.embedder_class.config_class

    def check_definition(self) -> None:
        """Raise ``ValueError`` naming what a spec lacks (called by ``register_modality``)."""
        if not isinstance(self.kind, str) or not self.kind.isidentifier():
            raise ValueError(f"{type(self).__name__}.kind must be an identifier such as 'spectrum', got {self.kind!r}")
        for attr in ("processor_class", "embedder_class"):
            if not isinstance(getattr(self, attr, None), type):
                raise ValueError(f"{type(self).__name__} (kind {self.kind!r}) must set {attr} to a class")
        if not hasattr(self.embedder_class, "config_class"):
            raise ValueError(f"{self.embedder_class.__name__} must set config_class (a dataclass of its settings)")
        if not self.arrays:
            raise ValueError(f"{type(self).__name__} (kind {self.kind!r}) must declare its arrays")
        bad = [f for f in self.cell_forms if f not in CELL_FORMS]
        if bad or not self.cell_forms:
            raise ValueError(f"{type(self).__name__}.cell_forms must be a non-empty subset of {CELL_FORMS}, got {bad}")

    def processor(self, name: str, **settings: Any) -> ModalityProcessor:
        """An unfitted processor for column ``name``: ``default_processor_settings`` updated with ``settings``."""
        return self.processor_class(name, **{**self.default_processor_settings, **settings})

    # ---- collation ----------------------------------------------------------------------------------------------
    @property
    def token_key(self) -> str:
        """The array whose first axis is the token axis (the first declared)."""
        return next(iter(self.arrays))

    def check_arrays(self, arrays: Mapping[str, Any], *, sample_id=None, modality=None) -> dict[str, np.ndarray]:
        """One sample's arrays as numpy, checked against :attr:`arrays` (keys, numeric dtype, rank, finite)."""
        conv: dict[str, np.ndarray] = {}
        for key, value in arrays.items():
            if value is None:  # e.g. no time stamps for a fixed-rate recording (Arrow rows)
                continue
            spec = self.arrays.get(key)
            if spec is None:
                raise DataError(
                    "unknown_key",
                    f"unexpected array {key!r} for a {self.kind} modality",
                    sample_id=sample_id,
                    modality=modality,
                    fix=f"processors of kind {self.kind} emit {sorted(self.arrays)}",
                )
            if spec.rank == 0:
                conv[key] = np.asarray(value, dtype=np.float64).reshape(())
                continue
            arr = np.asarray(value)
            if arr.dtype == object or arr.dtype.kind not in "biuf":
                raise DataError(
                    "bad_dtype",
                    f"{key} has dtype {arr.dtype} (ragged or non-numeric)",
                    sample_id=sample_id,
                    modality=modality,
                    fix="pass numeric arrays of the documented shape",
                )
            if spec.rank is not None and arr.ndim != spec.rank:
                raise DataError(
                    "wrong_shape",
                    f"{key} has shape {arr.shape}, expected {spec.rank} dimension(s)",
                    sample_id=sample_id,
                    modality=modality,
                    fix="re-run the processor for this modality",
                )
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise DataError(
                    "non_finite",
                    f"{key} contains NaN/inf",
                    sample_id=sample_id,
                    modality=modality,
                    fix="clean the input",
                )
            conv[key] = arr
        missing = [k for k, s in self.arrays.items() if s.required and k not in conv]
        if missing:
            raise DataError("missing_key", f"missing {missing[0]!r}", sample_id=sample_id, modality=modality)
        return conv

    def num_tokens(self, arrays: Mapping[str, np.ndarray]) -> int:
        """Tokens a processed sample gives the model (0 = the collator treats the modality as absent)."""
        return len(arrays[self.token_key])

    def collate(
        self,
        name: str,
        column: Sequence[Mapping[str, np.ndarray] | None],
        sample_ids: Sequence[Any],
        pad_len: Callable[[int], int],
    ) -> dict[str, torch.Tensor]:
        """Pad one modality's samples (``None`` = absent) into batch tensors.

        The default pads every rank-1 array along its token axis to ``pad_len(longest)`` and adds the
        ``(B, L)`` keep-mask :attr:`mask_key` (AND-ed with the processor's own mask when it emits one); an array of
        higher rank padded on its first axis only (per-token vectors, ``(L, F)``) becomes ``(B, L, F)``, its
        trailing sizes those of the samples (which must agree); rank-0 arrays become ``(B,)``.
        """
        b = len(column)
        keys = [k for k, s in self.arrays.items() if s.rank == 1 or (s.rank and s.pad_axes == (0,))]
        first = keys[0]
        length = pad_len(max(len(a[first]) for a in column if a is not None))
        trailing = {k: self._trailing_shape(k, column, sample_ids, name) for k in keys if self.arrays[k].rank > 1}
        trailing = {k: t for k, t in trailing.items() if t is not None}  # None: no sample holds it
        out = {
            k: torch.full((b, length, *trailing.get(k, ())), self.arrays[k].pad_value, dtype=self.arrays[k].dtype)
            for k in keys
            if self.arrays[k].rank == 1 or k in trailing
        }
        scalars = {k: torch.zeros(b, dtype=s.dtype) for k, s in self.arrays.items() if s.rank == 0}
        mask = torch.zeros((b, length), dtype=torch.bool)
        for i, a in enumerate(column):
            if a is None:
                continue
            n = len(a[first])
            for k in out:
                if k in a:
                    if len(a[k]) != n:
                        raise DataError(
                            "wrong_shape",
                            f"{k} has {len(a[k])} entries, {first} {n}",
                            sample_id=sample_ids[i],
                            modality=name,
                        )
                    out[k][i, :n] = torch.as_tensor(a[k], dtype=self.arrays[k].dtype)
            for k in scalars:
                if k in a:
                    scalars[k][i] = float(a[k])
            mask[i, :n] = True
        if self.mask_key in out:  # the processor gives its own mask (e.g. text attention_mask): keep both
            given = out[self.mask_key].bool() if _has(column, self.mask_key) else mask
            out[self.mask_key] = (mask & given).to(self.arrays[self.mask_key].dtype)
        else:
            out[self.mask_key] = mask
        for k, s in self.arrays.items():
            if not s.required and k != self.mask_key and not _has(column, k):
                out.pop(k, None)
                scalars.pop(k, None)
        return {**out, **scalars}

    def _trailing_shape(self, key, column, sample_ids, name) -> tuple[int, ...] | None:
        """The sizes after the token axis of a per-token array, the same in every sample that holds it."""
        shapes = {i: tuple(np.shape(a[key])[1:]) for i, a in enumerate(column) if a is not None and key in a}
        if not shapes:
            return None
        first = next(iter(shapes.values()))
        for i, shape in shapes.items():
            if shape != first:
                raise DataError(
                    "wrong_shape",
                    f"{key} has per-token shape {shape}, other samples of the batch {first}",
                    sample_id=sample_ids[i],
                    modality=name,
                    fix="process every sample with the same (saved) processor",
                )
        return first

    def rows_length(self, arrays: Mapping[str, torch.Tensor], index: torch.Tensor) -> int | None:
        """The padded length the batch rows ``index`` need alone (their longest real run along the token axis), for
        cutting a micro-batch's arrays (:func:`~bioperceiver.data.collator.select_rows`); ``None``: do not cut. The
        default layout (padded axis 1 + the ``(B, L)`` keep-mask :attr:`mask_key`) is cut; a kind with its own
        :meth:`collate` is not, unless it overrides this."""
        mask = arrays.get(self.mask_key)
        if type(self).collate is not ModalitySpec.collate or mask is None or mask.dim() != 2:
            return None
        real = mask.index_select(0, index.to(mask.device)).bool().any(0).nonzero()
        return int(real[-1]) + 1 if real.numel() else 1

    # ---- datasets (Arrow) ---------------------------------------------------------------------------------------
    def features(self, processor: ModalityProcessor) -> dict[str, Any]:
        """Explicit ``datasets`` features of one processed sample (robust to absent values and ragged arrays)."""
        import datasets

        list_type = getattr(datasets, "List", datasets.Sequence)
        out = {}
        for key, spec in self.arrays.items():
            if spec.rank is None:
                raise ValueError(f"kind {self.kind!r}: array {key!r} has no fixed rank; override features()")
            feat = datasets.Value(_ARROW_DTYPES[spec.dtype])
            for _ in range(spec.rank):
                feat = list_type(feat)
            out[key] = feat
        return out

    def to_row(self, arrays: Mapping[str, Any]) -> dict[str, Any]:
        """Processed arrays -> one Arrow row (every declared key, ``None`` where the sample has none)."""
        row = {}
        for key, spec in self.arrays.items():
            value = arrays.get(key)
            row[key] = float(value) if spec.rank == 0 and value is not None else value
        return row

    def from_row(self, row: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """An Arrow row (lists) back to arrays; empty multi-dimensional arrays get their rank back."""
        conv = {k: np.asarray(v) for k, v in row.items() if v is not None}
        for key, spec in self.arrays.items():
            arr = conv.get(key)
            if arr is not None and spec.rank and arr.ndim < spec.rank and arr.size == 0:
                conv[key] = arr.reshape((0,) * spec.rank)
        return conv

    # ---- manifest validation ------------------------------------------------------------------------------------
    def check_cell(self, value: Any, *, base_dir: str | os.PathLike | None, check_files: bool = True) -> list[Problem]:
        """The validator's cheap check of one non-missing manifest cell (no processor): its type, and for paths
        that the file exists, is readable and non-empty and that its header decodes (:meth:`check_file`)."""
        from ..data.manifest import as_mapping

        forms = self.cell_forms
        if "text" in forms and isinstance(value, str):
            if not value.strip():
                return [Problem("empty_text", "the text is empty", "set the cell to null or fill it")]
            return []
        if "mapping" in forms:
            mapping = as_mapping(value)
            if mapping is not None:
                out = self.check_mapping(mapping)
                if not mapping:
                    out.append(Problem("empty_mapping", "the mapping is empty", "set the cell to null"))
                return out
        if "path" in forms and isinstance(value, str) and value.strip():
            return self._check_path(value, base_dir, check_files)
        expected = " or ".join({"text": "text", "mapping": "a mapping", "path": "a file path"}[f] for f in forms)
        store = {"text": "store the value as text", "mapping": "store a dict or JSON", "path": "store a file path"}
        return [Problem("bad_type", f"expected {expected}, got {type(value).__name__}", store[forms[0]])]

    def _check_path(self, value: str, base_dir, check_files: bool) -> list[Problem]:
        from ..data.manifest import parse_reference

        out = []
        ref = parse_reference(value, base_dir)
        if check_files:
            if not ref.path.exists():
                return [Problem("missing_file", f"{ref.path} does not exist", "fix the path")]
            if not os.access(ref.path, os.R_OK):
                return [Problem("unreadable_file", f"{ref.path} is not readable", "fix permissions")]
            if ref.path.is_file() and ref.path.stat().st_size == 0:
                return [Problem("empty_file", f"{ref.path} is empty", "re-export the file")]
            out.extend(self.check_file(ref.path))
        out.extend(self.check_options(ref.options))
        return out

    def check_mapping(self, mapping: Mapping[str, Any]) -> list[Problem]:
        """Problems of an inline mapping cell's values (default: none)."""
        return []

    def check_file(self, path: Path) -> list[Problem]:
        """Problems found by decoding a referenced file's header only (default: none)."""
        return []

    def check_options(self, options: Mapping[str, str]) -> list[Problem]:
        """Problems of a path cell's ``#key=value`` options (default: none)."""
        return []

    def deep_check(
        self, processor: ModalityProcessor, value: Any, *, sample_id: str | None, base_dir: Path | None
    ) -> list[Problem]:
        """The validator's deep check: run the fitted processor on the cell. Any failure is reported as a problem of
        the cell (an unexpected exception included), never raised: one bad file must not end the validation."""
        try:
            processor(value, sample_id=sample_id, base_dir=base_dir)
        except DataError as err:
            return [Problem(err.reason, err.message, err.fix or "re-export the value or set the cell to null")]
        except Exception as err:
            return [
                Problem(
                    "processor_failed",
                    f"the {self.kind} processor failed on this value ({describe_failure(err)})",
                    "check the value opens with its usual reader; re-export it or set the cell to null",
                )
            ]
        return []

    # ---- attributions -------------------------------------------------------------------------------------------
    def token_labels(self, attribution: Any, modality: str) -> list[list[str]]:
        """Human-readable name of every token, ``[sample][token]`` (padding included), from the batch arrays in
        ``attribution.inputs[modality]`` and the fitted processor ``attribution.processors.get(modality)``."""
        b, n = attribution.scores[modality].shape
        return [[f"{self.token_unit} {i}" for i in range(n)] for _ in range(b)]

    def explanation_figures(self, attribution: Any, sample: int, path: Path, modality: str) -> dict[str, Path]:
        """The kind's own explanation figures of batch index ``sample`` (``interpret.explain_sample`` calls this
        for kinds it has no built-in plot for): ``{key: saved PNG}``, the main one at ``path`` under key
        ``modality``, extras beside it. Default: none."""
        return {}

    # ---- reporting ----------------------------------------------------------------------------------------------
    def describe(self, arrays: Mapping[str, np.ndarray]) -> tuple[str, int]:
        """A short description of one processed value and its length in the model's input units."""
        return self.token_key, self.num_tokens(arrays)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kind={self.kind!r}, processor={self.processor_class.__name__}, "
            f"embedder={self.embedder_class.__name__}, arrays={list(self.arrays)})"
        )


def _has(column, key) -> bool:
    return any(a is not None and key in a for a in column)


def finite_number(value: Any) -> bool:
    """True for an int/float (not bool) that is finite."""
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


NPY_FIX = "re-export it with numpy.save as a plain numeric array"


class NpyFileError(ValueError):
    """A ``.npy`` file that is not a readable numeric array (the message says why, never to unpickle it)."""


def npy_shape(path: Path) -> tuple[int, ...]:
    """Shape stored in a ``.npy`` header, after checking the file can hold it: the header decodes, the dtype is
    numeric (not pickled objects) and the file is as long as the header says (not truncated). The data is not read.
    Raises :class:`NpyFileError`."""
    from numpy.lib import format as npy_format

    path = Path(path)
    with open(path, "rb") as f:
        try:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                shape, _fortran, dtype = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _fortran, dtype = npy_format.read_array_header_2_0(f)
            else:
                shape, _fortran, dtype = npy_format._read_array_header(f, version)
        except Exception:
            raise NpyFileError(
                f"{path.name} is not a valid .npy array file (its header does not decode: corrupt, truncated or not "
                "written by numpy.save)"
            ) from None
        offset = f.tell()
    if dtype.hasobject:
        raise NpyFileError(f"{path.name} holds Python objects, not a numeric array")
    expected = offset + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise NpyFileError(
            f"{path.name} is truncated: its header announces {tuple(shape)} {dtype} ({expected} bytes) but the file "
            f"has {size} bytes"
        )
    return tuple(shape)


def load_npy(path: Path) -> np.ndarray:
    """``np.load(path, allow_pickle=False)`` of a user's file, with the checks of :func:`npy_shape` first; every
    failure is a :class:`NpyFileError` whose message diagnoses the file (numpy's own text for some corrupt files
    suggests unpickling them, which is both the wrong diagnosis and unsafe)."""
    npy_shape(path)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:
        raise NpyFileError(
            f"{Path(path).name} is not a valid .npy array file (corrupt or truncated: {type(err).__name__})"
        ) from None


def describe_failure(err: BaseException) -> str:
    """``"Type: message"`` of a decoder failure for a user, without numpy's advice to unpickle a file."""
    if isinstance(err, NpyFileError):
        return str(err)
    text = str(err)
    if "pickle" in text.lower():
        return "not a valid numpy array file (corrupt or truncated, or it holds Python objects)"
    return f"{type(err).__name__}: {text[:160]}"

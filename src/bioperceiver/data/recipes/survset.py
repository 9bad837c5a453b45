"""Multi-cohort expression + clinical + survival manifest from SurvSet and scikit-survival (real, pip-shipped data).

Nothing is downloaded: SurvSet 0.2.11 (``pip install --no-deps survset==0.2.11``) ships its cohorts as pickles and
scikit-survival 0.28.0 (the ``evidence`` extra) ships GSE7390 as an ARFF file. :func:`build_survset_cohort` writes
``output_dir/manifest.parquet`` (one row per patient) with its sidecar and one samples x tokens matrix per cohort
(``omics/<cohort>.parquet``, float32, index ``pid``, NaN = not measured).

Cohorts and their role
----------------------
*Development* cohorts (:data:`DEVELOPMENT_COHORTS`, the default) may be used for pretraining, tuning and model
selection. *External* cohorts (:data:`EXTERNAL_COHORTS`: gse3143, DBCD, DLBCL, chop, AML_Bull, vdv) can be built
for evaluation only; every row carries ``meta_cohort_role`` (``"development"`` or ``"external"``) so that a
pretraining or selection step can refuse them (:func:`development_rows`).

Measured on survset 0.2.11 / scikit-survival 0.28.0 (rows = patients; tokens after normalisation):

==============  =====  ======  ======  ========================================  =====================================
cohort          rows   events  tokens  expression features -> token scope        ``tabular_clinical`` <- column
==============  =====  ======  ======  ========================================  =====================================
gse1992         124    35      15,528  ``num_HS_<symbol>`` -> shared symbol      age <- num_age, tumor_size <- num_size
                                                                                 (fac_size repeats it), er <-
                                                                                 fac_er_positive, node_status, grade
gse4335         115    38      12,793  ``num_HS_<symbol>`` -> shared symbol      age, er <- fac_er_status, node_status
                                                                                 (N0/N1/N2; "x" missing), metastasis,
                                                                                 histology, tumor_size, grade (num_grade
                                                                                 repeats fac_grade)
NSBCD           115    38      549     ``gene_N`` -> ``NSBCD:gene_N``            none (SurvSet has no clinical column)
MCLcleaned      92     64      574     ``X<n>`` -> ``MCLcleaned:X<n>``           none
Bergamaschi     82     28      10      IMAGE clone ids -> cohort-scoped          none
nki70           144    48      66      70 symbols / Rosetta accessions ->        age <- num_Age, er <- fac_ER, grade <-
                                       shared (replicates ``X_1`` averaged)      fac_Grade, diameter <- fac_Diam,
                                                                                 nodes <- fac_N
dataOvarian1    912    544     158     symbols -> shared                         group <- fac_group (joint.Cox's study
                                                                                 group, also ``meta_batch``), debulk
GSE7390         198    51      76      HG-U133A probe ids -> ``affy:<probe>``    age, size, grade, er (sksurv columns)
gse3143 (ext)   158    50      8,659   ``num_HS_<symbol>`` -> shared symbol      er_level <- num_erlev (= fac_erlev)
DBCD (ext)      295    79      4,919   ``gene_N`` -> cohort-scoped               none
DLBCL (ext)     240    138     7,399   ``gene_N`` -> cohort-scoped               none
chop (ext)      414    165     3,833   HG-U133 Plus 2 probes -> ``affy:``        none
AML_Bull (ext)  116    67      6,283   ``gene_N`` -> cohort-scoped               none
vdv (ext)       78     34      4,705   Rosetta accessions -> shared (as nki70)   none
==============  =====  ======  ======  ========================================  =====================================

Tokens shared between cohorts (development): gse1992 ∩ gse4335 11,829, gse1992 ∩ dataOvarian1 147, gse1992 ∩ nki70
52; NSBCD, MCLcleaned and Bergamaschi share none by construction; GSE7390 shares 2 probes with chop only.

Which columns are clinical was decided by looking at every cohort's columns (SurvSet prefixes ``num_`` / ``fac_``):
every ``fac_`` column is clinical; the ``num_`` columns listed above are clinical; every other ``num_`` column is an
expression feature. GSE7390's clinical columns are sksurv's ``age``, ``size``, ``grade``, ``er``.

One vocabulary across platforms
-------------------------------
Gene symbols are normalised the same way in every cohort (:func:`normalise_symbol`): SurvSet's ``num_`` /
``num_HS_`` prefix removed, whitespace stripped, upper case, ``_`` and ``.`` -> ``-`` (SurvSet writes ``HLA-A`` in
gse1992 but ``HLA_A`` in gse4335; HGNC uses ``-``). Within one cohort, columns that normalise to the same token,
and replicate probes ``<X>_<n>`` whose ``<X>`` is also a column (nki70's ``DIAPH3_1``, ``DIAPH3_2``), are averaged
into one token (counted in the sidecar). A gene a platform does not measure is simply not a column of that
cohort's matrix, so it produces no token (absent, never a zero).

Cohorts whose features are anonymous carry *cohort-scoped* tokens ``<cohort>:<feature>`` (``NSBCD:gene_1``,
``MCLcleaned:X37``, ``Bergamaschi:IMAGE:753234``): ``gene_N`` and ``X<n>`` are column positions in their source
tables, not identifiers, and IMAGE clone ids are a cDNA-library identifier no other cohort uses. Scoping keeps them
from colliding with another cohort's ``gene_1`` while their profiles still count for within-profile objectives
(masked-gene-subset views); they share nothing across cohorts. Affymetrix probe ids (GSE7390, chop) are a
platform-wide identifier (the HG-U133 Plus 2.0 array repeats the HG-U133A probes), so they are scoped by platform
(``affy:200726_at``), not by cohort. The decision per cohort and its reason are in the sidecar's ``cohorts``.

Accession-named platforms can join the shared vocabulary through an offline map (``gene_map=`` /
``--gene_map tokenizers/gene_maps/survset_genbank_to_symbol.tsv``, built by ``tokenizers/build_gene_map.py`` from
Bioconductor's ``org.Hs.eg.db`` 3.16.0, which Debian ships as an SQLite file): in ``"symbol"``-scope cohorts a
GenBank / RefSeq accession (``AB002301``, ``NM_004702``, ``AA555029_RC``) that the map gives one gene becomes that
gene's normalised symbol; accessions of several genes or of none keep their names (counted in the sidecar's
``cohorts[...]["gene_map"]`` and the report). vdv: 3,136 of its 4,705 reporters map to 3,000 symbols (4,569 tokens
after averaging the accessions of one gene), of which 2,525 are gse1992's tokens (7 without the map); nki70: 1 of
70 (``NM_004702`` -> ``CCNE2``). The map is off by default, so manifests built without it are unchanged; its content
digest is one of the manifest's parameters. HG-U133 probe ids (GSE7390, chop) have no offline map here.

Values are as distributed (log-scale ratios or log intensities; negative values occur): process
``omics_expression`` with ``normalization="none"`` and a per-cohort standardisation fitted on training patients
(the sidecar's ``processor_settings``).

Per row: ``sample_id`` = ``patient_id`` = ``<source>:<pid>`` (namespaced by cohort; GSE7390 has no sample names in
sksurv, its pid is the row number), ``omics_expression`` (``omics/<cohort>.parquet#row=<pid>``),
``tabular_clinical`` (JSON; absent for cohorts without clinical columns), ``label_survival_time`` /
``label_survival_event`` (time units differ between cohorts, see ``cohorts[...]["time_unit"]``; C-index and Cox
models are unit-free), ``meta_source`` (``survset_<name>`` / ``sksurv_GSE7390``), ``meta_cohort_role`` and
``meta_batch`` (the cohort, or dataOvarian1's study group). There is no ``split`` column.

Rebuilding with the same parameters reuses the manifest; files are written under temporary names and the sidecar
last. Command line::

    python -m bioperceiver.data.recipes.survset --output_dir DIR [--cohorts NAME ...] [--overwrite_output_dir]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ...modalities.omics.gene_map import GeneMap, accession_key, average_same_named_columns, read_gene_map
from .common import (
    MANIFEST_NAME,
    RecipeError,
    RecipeInputError,
    RecipeReport,
    _plain,
    atomic_target,
    prepare_output_dir,
    previous_outputs,
    remove_stale_outputs,
    reusable_output,
    run_recipe,
    write_recipe_output,
)

logger = logging.getLogger(__name__)

NAME = "survset"
RECIPE = f"bioperceiver.data.recipes.{NAME}"
RECIPE_VERSION = 1  # bump when the same parameters give a different manifest
SURVSET_PIP = "pip install --no-deps survset==0.2.11"
SKSURV_PIP = 'pip install -e ".[evidence]"  (scikit-survival==0.28.0)'

DEVELOPMENT_COHORTS: tuple[str, ...] = (
    "gse1992",
    "gse4335",
    "NSBCD",
    "MCLcleaned",
    "Bergamaschi",
    "nki70",
    "dataOvarian1",
    "GSE7390",
)
EXTERNAL_COHORTS: tuple[str, ...] = ("gse3143", "DBCD", "DLBCL", "chop", "AML_Bull", "vdv")
ROLE_DEVELOPMENT, ROLE_EXTERNAL = "development", "external"

MODALITIES = {"omics_expression": "omics", "tabular_clinical": "tabular"}
LABELS = {"label_survival_time": "survival", "label_survival_event": "survival"}
PROCESSOR_SETTINGS = {"omics_expression": {"normalization": "none", "zscore": "per_source"}}  # one matrix per cohort
_MISSING = {"missing", "na", "nan", "none", "", "x", "unkown", "unknown"}


@dataclass(frozen=True)
class Clinical:
    """One clinical field: output key, source column, categorical or numeric, optional value map."""

    key: str
    column: str
    categorical: bool = True
    values: Mapping[str, str] = field(default_factory=dict)


_BIN = {"1": "positive", "0": "negative"}
_ER_WORDS = {"positive": "positive", "negative": "negative"}
_GRADE_WORDS = {
    "well diff": "1",
    "intermediate": "2",
    "poorly diff": "3",
    "well differentiated": "1",
    "poorly differentiated": "3",
}


@dataclass(frozen=True)
class CohortSpec:
    """How one cohort is read: source (``survset`` / ``sksurv``), token scope, clinical fields, notes."""

    name: str
    role: str
    scope: str  # "symbol" (shared vocabulary), "cohort" (cohort-scoped) or "affy" (platform-scoped probe ids)
    clinical: tuple[Clinical, ...] = ()
    source: str = "survset"
    r_package: str = ""
    time_unit: str = "unverified"
    endpoint: str = "unverified"
    batch_column: str | None = None
    reason: str = ""
    duplicates: tuple[str, ...] = ()  # columns that repeat a clinical field (same values): left out


_SYMBOL_REASON = "named gene symbols (or platform accessions): normalised and shared across cohorts"
_ANON_REASON = (
    "features are anonymous column positions in the source table ({example}), not gene identifiers: "
    "cohort-scoped tokens keep the profile usable (masked-gene-subset views) without false matches across cohorts"
)
_AFFY_REASON = (
    "Affymetrix probe ids; no offline probe-to-symbol annotation is available here, and the ids are shared by the "
    "HG-U133 arrays, so they are scoped by platform ('affy:'), not by cohort"
)

COHORTS: dict[str, CohortSpec] = {
    s.name: s
    for s in (
        CohortSpec(
            "gse1992",
            ROLE_DEVELOPMENT,
            "symbol",
            (
                Clinical("age", "num_age", False),
                Clinical("tumor_size", "num_size", False),
                Clinical("er", "fac_er_positive", values=_BIN),
                Clinical("node_status", "fac_node_status", values=_BIN),
                Clinical("grade", "fac_grade"),
            ),
            r_package="survJamda.data",
            time_unit="months",
            endpoint="relapse-free survival (SurvSet's processing: RFS months)",
            reason=_SYMBOL_REASON,
            duplicates=("fac_size",),
        ),
        CohortSpec(
            "gse4335",
            ROLE_DEVELOPMENT,
            "symbol",
            (
                Clinical("age", "num_age", False),
                Clinical("er", "fac_er_status", values=_BIN),
                Clinical("node_status", "fac_node_status", values={"0": "N0", "1": "N1", "2": "N2"}),
                Clinical("metastasis", "fac_metastasis", values=_BIN),
                Clinical("histology", "fac_histology"),
                Clinical("tumor_size", "fac_tumor_size"),
                Clinical("grade", "fac_grade"),
            ),
            r_package="survJamda.data",
            time_unit="months",
            endpoint="overall survival (binarisation of the 4-level status unverified)",
            reason=_SYMBOL_REASON,
            duplicates=("num_grade",),
        ),
        CohortSpec(
            "NSBCD",
            ROLE_DEVELOPMENT,
            "cohort",
            r_package="dmkd.cs.vt.edu survival data",
            time_unit="months (unverified)",
            reason=_ANON_REASON.format(example="gene_1 ... gene_549"),
        ),
        CohortSpec(
            "MCLcleaned",
            ROLE_DEVELOPMENT,
            "cohort",
            r_package="AdapEnetClass",
            time_unit="years",
            reason=_ANON_REASON.format(example="X37, X38 ..."),
        ),
        CohortSpec(
            "Bergamaschi",
            ROLE_DEVELOPMENT,
            "cohort",
            r_package="RCASPAR",
            time_unit="years",
            reason="features are IMAGE cDNA clone ids (10 of them) that no other cohort measures and no offline "
            "annotation maps to symbols: cohort-scoped tokens",
        ),
        CohortSpec(
            "nki70",
            ROLE_DEVELOPMENT,
            "symbol",
            (
                Clinical("age", "num_Age", False),
                Clinical("er", "fac_ER", values=_ER_WORDS),
                Clinical("grade", "fac_Grade", values=_GRADE_WORDS),
                Clinical("diameter", "fac_Diam"),
                Clinical("nodes", "fac_N"),
            ),
            r_package="penalized",
            time_unit="years",
            endpoint="metastasis-free survival",
            reason=_SYMBOL_REASON + "; replicate probes <X>_<n> averaged into <X>",
        ),
        CohortSpec(
            "dataOvarian1",
            ROLE_DEVELOPMENT,
            "symbol",
            (Clinical("group", "fac_group"), Clinical("debulk", "fac_debulk")),
            r_package="joint.Cox",
            time_unit="days",
            endpoint="t.event / event of joint.Cox's dataOvarian1",
            batch_column="fac_group",
            reason=_SYMBOL_REASON,
        ),
        CohortSpec(
            "GSE7390",
            ROLE_DEVELOPMENT,
            "affy",
            (
                Clinical("age", "age", False),
                Clinical("size", "size", False),
                Clinical("grade", "grade", values=_GRADE_WORDS),
                Clinical("er", "er", values=_ER_WORDS),
            ),
            source="sksurv",
            time_unit="days",
            endpoint="time to distant metastasis (t.tdm / e.tdm)",
            reason=_AFFY_REASON,
        ),
        CohortSpec(
            "gse3143",
            ROLE_EXTERNAL,
            "symbol",
            (Clinical("er_level", "num_erlev", False),),
            r_package="survJamda.data",
            time_unit="months",
            reason=_SYMBOL_REASON,
            duplicates=("fac_erlev",),
        ),
        CohortSpec(
            "DBCD",
            ROLE_EXTERNAL,
            "cohort",
            r_package="dmkd.cs.vt.edu survival data",
            reason=_ANON_REASON.format(example="gene_N"),
        ),
        CohortSpec(
            "DLBCL",
            ROLE_EXTERNAL,
            "cohort",
            r_package="dmkd.cs.vt.edu survival data",
            reason=_ANON_REASON.format(example="gene_N"),
        ),
        CohortSpec("chop", ROLE_EXTERNAL, "affy", r_package="bujar", reason=_AFFY_REASON),
        CohortSpec(
            "AML_Bull",
            ROLE_EXTERNAL,
            "cohort",
            r_package="dmkd.cs.vt.edu survival data",
            reason=_ANON_REASON.format(example="gene_N"),
        ),
        CohortSpec(
            "vdv", ROLE_EXTERNAL, "symbol", r_package="randomForestSRC", time_unit="years", reason=_SYMBOL_REASON
        ),
    )
}


# ------------------------------------------------------------------------------------------------------------------
# gene tokens


_ACCESSION = re.compile(r"[A-Za-z]{2}_\d+(\.\d+)?|.+_RC", re.IGNORECASE)


def normalise_symbol(name: str) -> str:
    """A gene symbol as it appears in the shared vocabulary: SurvSet's ``num_`` / ``num_HS_`` prefix removed,
    whitespace stripped, upper case, ``_`` and ``.`` written ``-`` (``num_HS_HLA_A`` -> ``HLA-A``), except in
    accession-style probe names (``NM_004702``, ``Contig63649_RC``), which are only upper-cased."""
    s = str(name).strip()
    for prefix in ("num_HS_", "num_"):
        if s.startswith(prefix):
            s = s[len(prefix) :]
            break
    s = re.sub(r"\s+", "", s)
    if _ACCESSION.fullmatch(s):  # NM_004702, Contig63649_RC: identifiers whose '_' is part of the name
        return s.upper()
    return re.sub(r"[_.]", "-", s).upper()


def feature_tokens(
    columns: Sequence[str], spec: CohortSpec, gene_map: GeneMap | None = None
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """``column -> token`` for a cohort's expression columns, and ``token -> columns`` where several columns
    become one token (replicate probes, names equal after normalisation, accessions of one gene; they are averaged).
    With a ``gene_map``, accession-shaped names of a ``"symbol"``-scope cohort that the map knows become the
    (normalised) symbol of their gene; the others keep their names."""
    raw = {c: re.sub(r"^num_(HS_)?" if spec.scope == "symbol" else r"^num_", "", c) for c in columns}
    if spec.scope == "cohort":
        mapping = {c: f"{spec.name}:{raw[c]}" for c in columns}
    elif spec.scope == "affy":
        mapping = {c: "affy:" + re.sub(r"^X(?=\d)", "", raw[c]) for c in columns}  # R's make.names added X
    else:
        present = {raw[c] for c in columns}
        mapping = {}
        for c in columns:
            base = re.fullmatch(r"(.+)_(\d+)", raw[c])
            name = base.group(1) if base and base.group(1) in present else raw[c]  # replicate probe of a named gene
            symbol = gene_map.symbol(name) if gene_map is not None else None
            mapping[c] = normalise_symbol(symbol if symbol is not None else name)
    groups: dict[str, list[str]] = {}
    for c, t in mapping.items():
        groups.setdefault(t, []).append(c)
    return mapping, {t: cs for t, cs in groups.items() if len(cs) > 1}


# ------------------------------------------------------------------------------------------------------------------
# loading


def _version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _load_survset(name: str) -> tuple[pd.DataFrame, str]:
    try:
        from SurvSet.data import SurvLoader  # light import: pandas only
    except ImportError as exc:
        raise RecipeInputError(f"SurvSet cohort {name!r} needs the 'survset' package. Fix: {SURVSET_PIP}") from exc
    loader = SurvLoader()
    if name not in set(loader.df_ds["ds"].astype(str)):
        raise RecipeError(f"SurvSet has no dataset {name!r}; see SurvSet.data.SurvLoader().df_ds['ds']")
    with warnings.catch_warnings():  # SurvSet's pickles reference numpy.core (DeprecationWarning on numpy 2)
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = loader.load_dataset(name)
    df = loaded["df"].reset_index(drop=True)
    if "time2" in df.columns and df["time2"].notna().any():
        raise RecipeError(f"SurvSet dataset {name!r} has time-varying covariates (time2); not supported")
    return df, str(loaded.get("ref") or "https://github.com/ErikinBC/SurvSet")


def _load_gse7390() -> tuple[pd.DataFrame, str]:
    try:
        from sksurv.datasets import load_breast_cancer
    except ImportError as exc:
        raise RecipeInputError(f"GSE7390 needs scikit-survival. Fix: {SKSURV_PIP}") from exc
    x, y = load_breast_cancer()
    df = x.reset_index(drop=True).copy()
    df.insert(0, "pid", [str(i) for i in range(len(df))])
    df["event"] = np.asarray(y["e.tdm"], dtype=int)
    df["time"] = np.asarray(y["t.tdm"], dtype=float)
    # expression columns get the SurvSet spelling so one code path reads both sources
    clinical = {c.column for c in COHORTS["GSE7390"].clinical}
    df = df.rename(columns={c: f"num_{c}" for c in x.columns if c not in clinical})
    return df, "https://www.ncbi.nlm.nih.gov/geo/query/acc.cgi?acc=GSE7390"


def _clinical_rows(df: pd.DataFrame, spec: CohortSpec) -> list[dict[str, Any]] | None:
    if not spec.clinical:
        return None
    missing = [c.column for c in spec.clinical if c.column not in df.columns]
    if missing:
        raise RecipeError(f"{spec.name}: clinical column(s) {missing} not found; the recipe expects survset==0.2.11")
    out = []
    for i in range(len(df)):
        item: dict[str, Any] = {}
        for c in spec.clinical:
            v = df.at[i, c.column]
            if not c.categorical:
                item[c.key] = _plain(pd.to_numeric(v, errors="coerce"))
                continue
            text = None if pd.isna(v) else str(v).strip()
            if text is None or text.lower() in _MISSING:
                item[c.key] = None
            else:
                item[c.key] = c.values.get(text, c.values.get(text.lower(), text)) if c.values else text
        out.append(item)
    return out


def _expression_columns(df: pd.DataFrame, spec: CohortSpec) -> list[str]:
    """Every ``num_`` column that is not a clinical field or a duplicate of one; an unlisted ``fac_`` column is an
    error (a new SurvSet version changed the table: decide where it belongs before building)."""
    known = {c.column for c in spec.clinical} | set(spec.duplicates)
    unlisted = [c for c in df.columns if c.startswith("fac_") and c not in known]
    if unlisted:
        raise RecipeError(
            f"{spec.name}: categorical column(s) {unlisted} are not in the recipe's clinical table; the recipe "
            "expects survset==0.2.11. Fix: install that version, or add the columns to COHORTS"
        )
    return [c for c in df.columns if c.startswith("num_") and c not in known]


def _build_cohort(
    spec: CohortSpec, out_dir: Path, report: RecipeReport, gene_map: GeneMap | None = None
) -> tuple[list[dict], dict, dict, str]:
    df, ref = _load_gse7390() if spec.source == "sksurv" else _load_survset(spec.name)
    report.read[f"{spec.source}:{spec.name}"] += len(df)
    df["pid"] = df["pid"].astype(str)
    if not df["pid"].is_unique:
        raise RecipeError(f"{spec.name}: pid is not unique; patient ids would collide")
    columns = _expression_columns(df, spec)
    if not columns:
        raise RecipeError(f"{spec.name}: no expression columns found")
    mapping, merged = feature_tokens(columns, spec, gene_map)
    mapped = {}
    if gene_map is not None and spec.scope == "symbol":
        raw = {c: re.sub(r"^num_(HS_)?", "", c) for c in columns}
        shaped = [c for c in columns if accession_key(raw[c]) is not None]
        mapped = {c: mapping[c] for c in shaped if gene_map.symbol(raw[c]) is not None}
        if mapped:
            report.note(f"{spec.name}:accessions_mapped_to_symbols", len(mapped))
        if len(shaped) > len(mapped):
            report.note(f"{spec.name}:accessions_not_in_gene_map", len(shaped) - len(mapped))
    values = df[columns].apply(pd.to_numeric, errors="coerce").astype("float64")
    values.columns = [mapping[c] for c in columns]
    matrix = average_same_named_columns(values).astype("float32")
    matrix.index = pd.Index(df["pid"], name="pid")
    n_missing = int(matrix.isna().to_numpy().sum())
    if n_missing:
        report.note(f"{spec.name}:expression_values_not_measured", n_missing)
    if merged:
        report.note(f"{spec.name}:columns_averaged_into_one_token", sum(len(v) for v in merged.values()))
    source = "sksurv_GSE7390" if spec.source == "sksurv" else f"survset_{spec.name}"
    rel = f"omics/{spec.name}.parquet"
    with atomic_target(out_dir / rel) as tmp:
        matrix.to_parquet(tmp, index=True)
    clinical = _clinical_rows(df, spec)
    rows = []
    for i, pid in enumerate(df["pid"]):
        t, e = df.at[i, "time"], df.at[i, "event"]
        if pd.isna(t) or pd.isna(e) or float(t) < 0:
            report.exclude("survival_label_missing_or_negative", example=f"{source}:{pid}")
            continue
        batch = source if spec.batch_column is None else f"{source}:group{df.at[i, spec.batch_column]}"
        rows.append(
            {
                "sample_id": f"{source}:{pid}",
                "patient_id": f"{source}:{pid}",
                "omics_expression": f"{rel}#row={quote(pid, safe='-_.()~')}",
                "tabular_clinical": None if clinical is None else _tabular(clinical[i]),
                "label_survival_time": float(t),
                "label_survival_event": int(e),
                "meta_source": source,
                "meta_cohort_role": spec.role,
                "meta_batch": batch,
            }
        )
    info = {
        "role": spec.role,
        "source": source,
        "rows": len(rows),
        "events": int(sum(r["label_survival_event"] for r in rows)),
        "expression_columns": len(columns),
        "tokens": int(matrix.shape[1]),
        "token_scope": spec.scope,
        "token_reason": spec.reason,
        "token_examples": list(matrix.columns[:3]),
        "averaged_columns": {t: cs for t, cs in list(merged.items())[:20]},
        "averaged_tokens": len(merged),
        **(
            {
                "gene_map": {
                    "accessions_mapped": len(mapped),
                    "symbols": len(set(mapped.values())),
                    "examples": dict(list(mapped.items())[:5]),
                }
            }
            if gene_map is not None and spec.scope == "symbol"
            else {}
        ),
        "clinical": {c.key: c.column for c in spec.clinical},
        "time_unit": spec.time_unit,
        "endpoint": spec.endpoint,
        "matrix": rel,
    }
    if spec.source == "sksurv":
        src = {
            "name": source,
            "package": "scikit-survival",
            "version": _version("scikit-survival"),
            "files": ["sksurv/datasets/data/breast_cancer_GSE7390-metastasis.arff"],
            "licence": "scikit-survival is GPL-3.0; the data are the public GEO series GSE7390 (TRANSBIG, "
            "Desmedt et al. 2007); GEO places no restrictions on use (NCBI disclaimer)",
            "citation": "Desmedt C et al. Clin Cancer Res 13(11):3207-14 (2007); Pölsterl S. scikit-survival. "
            "JMLR 21(212):1-6 (2020)",
            "url": ref,
        }
    else:
        src = {
            "name": source,
            "package": "survset",
            "version": _version("survset"),
            "files": [f"SurvSet/resources/pickles/{spec.name}.pickle"],
            "licence": f"SurvSet package (GPL-3.0 per its metadata: {_licence('survset')}); the data come from the "
            f"R source {spec.r_package or 'named in url'} (licence not verified here)",
            "citation": "Drysdale E. SurvSet: An open-source time-to-event dataset repository. arXiv:2203.03094 "
            "(2022), and the source named in url",
            "url": ref,
        }
    return rows, info, src, rel


def _licence(dist: str) -> str:
    import importlib.metadata

    try:
        md = importlib.metadata.metadata(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
    for key in ("License-Expression", "License"):
        value = md.get(key)
        if value and value.strip() and len(value) < 200:
            return value.strip()
    classifiers = [c.split("::")[-1].strip() for c in (md.get_all("Classifier") or []) if c.startswith("License")]
    return "; ".join(classifiers) or "unverified"


def _tabular(fields: Mapping[str, Any]) -> str:
    return json.dumps({k: _plain(v) for k, v in fields.items()}, allow_nan=False, ensure_ascii=False)


def _params(cohorts: Sequence[str], gene_map: GeneMap | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"recipe_version": RECIPE_VERSION, "cohorts": [str(c) for c in cohorts]}
    if gene_map is not None:  # only then: manifests built without a map keep their parameters
        params["gene_map_sha256"] = gene_map.sha256
    return params


def development_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows a pretraining, tuning or selection step may use (``meta_cohort_role == "development"``)."""
    return table[table["meta_cohort_role"] == ROLE_DEVELOPMENT]


def build_survset_cohort(
    output_dir: str | os.PathLike,
    cohorts: Sequence[str] = DEVELOPMENT_COHORTS,
    overwrite: bool = False,
    gene_map: str | os.PathLike | GeneMap | None = None,
) -> Path:
    """Build (or reuse) the multi-cohort expression manifest in ``output_dir``; returns ``manifest.parquet``.

    Args:
        output_dir: folder to write into (outside the repository, or under its ignored ``outputs/``).
        cohorts: names from :data:`DEVELOPMENT_COHORTS` and :data:`EXTERNAL_COHORTS` (external ones are flagged
            ``meta_cohort_role="external"``: evaluation only).
        overwrite: rebuild even when a manifest with the same parameters exists, or replace one another recipe
            wrote.
        gene_map: an accession -> symbol map (a TSV from ``tokenizers/build_gene_map.py``, or a loaded
            :class:`~bioperceiver.modalities.omics.gene_map.GeneMap`): accession-named features of symbol-scope
            cohorts (vdv's Rosetta reporters, one of nki70's features) become the symbols of their genes, so they
            share tokens with symbol-named cohorts. Its content digest is one of the manifest's parameters.

    Raises:
        RecipeError: an unknown cohort name, or a source table not as expected.
        RecipeInputError: SurvSet or scikit-survival is not installed (the message gives the pip command).
        FileExistsError: ``output_dir`` holds a manifest this recipe did not write and ``overwrite`` is False.
    """
    if isinstance(cohorts, str):
        cohorts = (cohorts,)
    cohorts = list(dict.fromkeys(cohorts))
    unknown = [c for c in cohorts if c not in COHORTS]
    if unknown or not cohorts:
        raise RecipeError(
            f"unknown cohort(s) {unknown or '(none given)'}; choose from development {list(DEVELOPMENT_COHORTS)} "
            f"or external (evaluation only) {list(EXTERNAL_COHORTS)}"
        )
    out = Path(output_dir).expanduser().resolve()
    manifest = out / MANIFEST_NAME
    if gene_map is not None and not isinstance(gene_map, GeneMap):
        gene_map = read_gene_map(gene_map)
    params = _params(cohorts, gene_map)
    if not overwrite and reusable_output(manifest, RECIPE, params):
        logger.info("survset cohort up to date: %s", manifest)
        return manifest
    previous = previous_outputs(manifest, RECIPE, overwrite)
    out = prepare_output_dir(out, overwrite=True)
    started = time.perf_counter()
    report = RecipeReport(NAME)
    rows: list[dict[str, Any]] = []
    infos: dict[str, Any] = {}
    sources: list[dict[str, Any]] = []
    outputs: list[str] = []
    for name in tqdm(cohorts, desc="SurvSet cohorts", leave=False):
        part, info, src, rel = _build_cohort(COHORTS[name], out, report, gene_map)
        rows += part
        infos[name] = info
        sources.append(src)
        outputs.append(rel)
        logger.info("%s: %d patients, %d events, %d tokens (%s)", name, info["rows"], info["events"],
                    info["tokens"], info["token_scope"])  # fmt: skip
    table = pd.DataFrame(rows)
    if table["tabular_clinical"].isna().all():
        table = table.drop(columns=["tabular_clinical"])
    table["label_survival_event"] = table["label_survival_event"].astype("Int64")
    vocab: dict[str, set[str]] = {n: set(pd.read_parquet(out / infos[n]["matrix"]).columns) for n in cohorts}
    shared = Counter(t for toks in vocab.values() for t in toks)
    extra = {
        "sources": sources,
        "cohorts": infos,
        "development_cohorts": [c for c in cohorts if COHORTS[c].role == ROLE_DEVELOPMENT],
        "external_cohorts": [c for c in cohorts if COHORTS[c].role == ROLE_EXTERNAL],
        "external_note": "external cohorts are for evaluation only: never pretrain, tune or select on them",
        "vocabulary": {
            "tokens": len(shared),
            "tokens_in_several_cohorts": sum(1 for v in shared.values() if v > 1),
            "per_cohort": {n: len(v) for n, v in vocab.items()},
            "normalisation": "prefix num_/num_HS_ removed, whitespace stripped, upper case, '_' and '.' -> '-'; "
            "anonymous features '<cohort>:<feature>', Affymetrix probes 'affy:<probe>'",
            **(
                {
                    "gene_map": {
                        "file": Path(gene_map.path).name,
                        "sha256": gene_map.sha256,
                        "accessions": len(gene_map),
                        "source": gene_map.source.get("source", ""),
                    }
                }
                if gene_map is not None
                else {}
            ),
        },
        "processor_settings": PROCESSOR_SETTINGS,
    }
    path = write_recipe_output(
        table,
        out,
        name=NAME,
        provenance={
            "dataset": "SurvSet expression cohorts + scikit-survival GSE7390",
            "version": f"survset {_version('survset')}, scikit-survival {_version('scikit-survival')}",
            "url": "https://github.com/ErikinBC/SurvSet",
            "input": "installed pip packages (no download)",
        },
        licence_note="Public research data redistributed by the SurvSet (GPL-3.0) and scikit-survival (GPL-3.0) "
        "packages; each cohort's original source and its terms are listed under 'sources'. External cohorts "
        "(meta_cohort_role == 'external') are for evaluation only.",
        versions={"survset": _version("survset"), "scikit-survival": _version("scikit-survival")},
        report=report,
        modalities={c: k for c, k in MODALITIES.items() if c in table.columns},
        labels=LABELS,
        label_notes={
            "label_survival_time": "time to event or censoring; units differ by cohort (cohorts[...].time_unit)",
            "label_survival_event": "1 = event observed, 0 = censored; endpoint per cohort (cohorts[...].endpoint)",
        },
        params=params,
        outputs=outputs,
        recipe_version=RECIPE_VERSION,
        extra=extra,
        started=started,
    )
    remove_stale_outputs(out, previous, outputs)
    return path


def _main(args: argparse.Namespace) -> Path:
    return build_survset_cohort(
        args.output_dir, args.cohorts, overwrite=args.overwrite_output_dir, gene_map=args.gene_map
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {RECIPE}",
        description="Build the multi-cohort SurvSet (+ sksurv GSE7390) expression manifest into OUTPUT_DIR.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output_dir", required=True, help="folder to write into (outside the repository)")
    p.add_argument(
        "--cohorts",
        nargs="+",
        default=list(DEVELOPMENT_COHORTS),
        help=f"cohorts; external (evaluation only): {' '.join(EXTERNAL_COHORTS)}",
    )
    p.add_argument("--overwrite_output_dir", "--overwrite", action="store_true", help="rebuild even if up to date")
    p.add_argument(
        "--gene_map",
        default=None,
        help="accession -> symbol TSV (tokenizers/gene_maps/survset_genbank_to_symbol.tsv): vdv's accessions become "
        "symbols shared with the other cohorts",
    )
    p.add_argument("--log_level", default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_recipe(_main, parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

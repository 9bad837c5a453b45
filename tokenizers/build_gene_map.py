#!/usr/bin/env python
"""Build an accession -> gene-symbol map (TSV) from Bioconductor's ``org.Hs.eg.db`` SQLite file, offline.

    apt-get download r-bioc-org.hs.eg.db && dpkg -x r-bioc-org.hs.eg.db_3.16.0-1_all.deb /tmp/orgdb
    python tokenizers/build_gene_map.py \
        --orgdb /tmp/orgdb/usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite \
        --survset --output tokenizers/gene_maps/survset_genbank_to_symbol.tsv
    python tokenizers/build_gene_map.py --orgdb ... --ids my_platform_features.txt --output my_map.tsv

Maps the accession-shaped identifiers asked for (``--survset``: every expression feature of the SurvSet recipe's
cohorts; ``--ids``: text files, one identifier per line) to one Entrez gene and its symbol; accessions of more
than one gene, and those not in the database, are left out and counted. The TSV's ``#`` lines record the source
(package version, Entrez Gene date, the SQLite file's sha256) and the counts. Give the map to the SurvSet recipe
with ``--gene_map`` (``python -m bioperceiver.data.recipes.survset``, ``benchmarks/survival_cv.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bioperceiver.hashing import file_sha256
from bioperceiver.modalities.omics.gene_map import DEBIAN_ORGDB, build_accession_map, orgdb_metadata, write_gene_map

logger = logging.getLogger("build_gene_map")


def survset_identifiers() -> dict[str, list[str]]:
    """Every SurvSet-recipe cohort's expression feature names (SurvSet's ``num_`` prefix removed)."""
    from bioperceiver.data.recipes import survset as recipe

    out = {}
    for name, spec in recipe.COHORTS.items():
        df, _ = recipe._load_gse7390() if spec.source == "sksurv" else recipe._load_survset(name)
        out[name] = [c.removeprefix("num_") for c in recipe._expression_columns(df, spec)]
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orgdb", default=DEBIAN_ORGDB, help="org.Hs.eg.sqlite (where Debian's package puts it)")
    p.add_argument("--survset", action="store_true", help="map the SurvSet recipe cohorts' feature names")
    p.add_argument("--ids", nargs="+", default=[], help="text files, one identifier per line")
    p.add_argument("--output", required=True, help="TSV to write")
    p.add_argument("--log_level", default="INFO")
    args = p.parse_args(argv)
    if not args.survset and not args.ids:
        p.error("give --survset and/or --ids FILE ...")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ids: list[str] = []
    asked_from = []
    if args.survset:
        per_cohort = survset_identifiers()
        ids += [i for names in per_cohort.values() for i in names]
        asked_from.append(f"SurvSet recipe cohorts ({', '.join(per_cohort)})")
    for f in args.ids:
        ids += [line.strip() for line in Path(f).read_text().splitlines() if line.strip()]
        asked_from.append(str(f))
    mapping, counts = build_accession_map(args.orgdb, ids)
    meta = orgdb_metadata(args.orgdb)
    header = {
        "what": "accession (GenBank/RefSeq, version and _RC removed) -> one Entrez gene's symbol",
        "source": f"Bioconductor {meta.get('package_package', 'org.Hs.eg.db')} {meta.get('package_version', '?')} "
        f"(Debian r-bioc-org.hs.eg.db), {meta.get('EGSOURCENAME', 'Entrez Gene')} of "
        f"{meta.get('EGSOURCEDATE', '?')}, organism {meta.get('ORGANISM', '?')}",
        "licence": "org.Hs.eg.db is Artistic-2.0; NCBI Entrez Gene data are in the public domain (NCBI disclaimer)",
        "sqlite_sha256": file_sha256(args.orgdb),
        "identifiers_from": "; ".join(asked_from),
        "counts": json.dumps(
            {k: v for k, v in vars(counts).items() if k != "ambiguous_examples"}, separators=(",", ":")
        ),
        "ambiguous_left_out": "; ".join(counts.ambiguous_examples) or "none",
        "command": "python tokenizers/build_gene_map.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    path = write_gene_map(args.output, mapping, header)
    logger.info(
        "%d identifiers: %d not accession-shaped, %d mapped to one gene (%d symbols), %d to several (left out), "
        "%d not found -> %s",
        counts.asked,
        counts.not_accessions,
        counts.mapped,
        len({s for s, _ in mapping.values()}),
        counts.ambiguous,
        counts.not_found,
        path,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

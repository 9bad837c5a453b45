#!/usr/bin/env python
"""Build per-gene feature vectors from GO / KEGG annotation (Bioconductor's ``org.Hs.eg.db``), offline, and give
them to fitted omics processors.

    apt-get download r-bioc-org.hs.eg.db && dpkg -x r-bioc-org.hs.eg.db_3.16.0-1_all.deb /tmp/orgdb
    python tokenizers/build_gene_features.py \
        --orgdb /tmp/orgdb/usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite \
        --output tokenizers/gene_features/org_hs_go_kegg_svd64.safetensors
    # a fitted processor folder (e.g. a run's processor/), the same tokens plus each gene's features:
    python tokenizers/build_gene_features.py --features tokenizers/gene_features/org_hs_go_kegg_svd64.safetensors \
        --attach_to runs/a/processor --output_dir runs/a/processor_genefeat

The features (``bioperceiver.modalities.omics.gene_features``) are the truncated SVD of the TF-IDF weighted gene x
term table: genes that share GO terms and KEGG pathways get nearby vectors. Set a processor's
``gene_features_file`` to the file before fitting (processor settings YAML), or attach it to a fitted one with
``--attach_to``; a model built from such a processor maps each token's features into its gene identity
(``OmicsConfig.gene_feature_dim``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from bioperceiver.modalities.omics.gene_features import ANNOTATION_TABLES, GeneFeatures, build_gene_features
from bioperceiver.modalities.omics.gene_map import DEBIAN_ORGDB

logger = logging.getLogger("build_gene_features")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orgdb", default=DEBIAN_ORGDB, help="org.Hs.eg.sqlite (where Debian's package puts it)")
    p.add_argument("--output", help="feature file to build (.safetensors)")
    p.add_argument("--dim", type=int, default=64, help="SVD components per gene")
    p.add_argument("--tables", nargs="+", default=list(ANNOTATION_TABLES), choices=list(ANNOTATION_TABLES))
    p.add_argument("--min_genes_per_term", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", help="an existing feature file to attach (instead of building one)")
    p.add_argument("--attach_to", help="a fitted processor folder (bioperceiver_processor.json + processors/)")
    p.add_argument("--modalities", nargs="+", help="omics modalities to attach to (default: every omics one)")
    p.add_argument("--output_dir", help="where the processor folder with gene features is written")
    p.add_argument("--log_level", default="INFO")
    args = p.parse_args(argv)
    if not args.output and not args.features:
        p.error("give --output (build a feature file) or --features (use one)")
    if args.attach_to and not args.output_dir:
        p.error("--attach_to needs --output_dir (the fitted folder is not modified)")
    if args.output_dir and not args.attach_to:
        p.error("--output_dir is the folder --attach_to writes; give --attach_to")
    return args


def attach(features: Path, processor_dir: Path, output_dir: Path, modalities: list[str] | None) -> dict:
    """Copy ``processor_dir`` to ``output_dir`` with ``features`` attached to its omics processors; the coverage per
    modality. ``output_dir`` must not be ``processor_dir``."""
    from bioperceiver.data.processing import BioPerceiverProcessor

    if output_dir.resolve() == processor_dir.resolve():
        raise ValueError(f"--output_dir {output_dir} is the fitted folder itself: write the copy elsewhere")
    if processor_dir.resolve().is_relative_to(output_dir.resolve()):
        raise ValueError(f"--output_dir {output_dir} holds --attach_to {processor_dir}: write the copy elsewhere")
    if output_dir.exists() and not (output_dir / "gene_features_attached.json").is_file() and any(output_dir.iterdir()):
        # only a folder this command wrote is replaced: anything else there (a run, a model) is the user's
        raise ValueError(
            f"--output_dir {output_dir} exists and is not a copy this command wrote: choose a new or empty folder"
        )
    processor = BioPerceiverProcessor.from_pretrained(processor_dir)
    omics = [name for name, proc in processor.processors.items() if hasattr(proc, "attach_gene_features")]
    chosen = modalities or omics
    unknown = sorted(set(chosen) - set(omics))
    if unknown or not chosen:
        raise ValueError(f"no omics modality {unknown or ''} in {processor_dir}; its omics modalities: {omics}")
    coverage = {name: processor.processors[name].attach_gene_features(features) for name in chosen}
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    processor.save_pretrained(tmp)
    (tmp / "gene_features_attached.json").write_text(
        json.dumps({"from": str(processor_dir), "features": str(features), "coverage": coverage}, indent=1) + "\n"
    )
    shutil.rmtree(output_dir, ignore_errors=True)
    tmp.rename(output_dir)
    return coverage


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.output:
        table = build_gene_features(args.orgdb, args.dim, args.tables, args.min_genes_per_term, args.seed)
        table.save(args.output)
        logger.info("wrote %s (%d genes x %d, sha256 %s)", args.output, len(table), table.dim, table.sha256[:12])
    features = Path(args.features or args.output)
    if args.attach_to:
        coverage = attach(features, Path(args.attach_to), Path(args.output_dir), args.modalities)
        for name, cov in coverage.items():
            logger.info("%s: features for %d of %d vocabulary genes", name, cov["with_features"], cov["genes"])
        logger.info("wrote %s", args.output_dir)
    elif args.features:
        table = GeneFeatures.load(features)
        logger.info("%s: %d genes x %d; %s", features, len(table), table.dim, table.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())

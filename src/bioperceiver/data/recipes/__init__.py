"""Recipes that turn public layouts into manifests: ``demo`` (the bundled real cohort), ``synthetic``, and the
public-cohort recipes ``ptbxl``, ``tcga`` and ``mimic`` built on the shared base in ``common``."""

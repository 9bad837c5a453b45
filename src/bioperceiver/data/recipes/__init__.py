"""Recipes that turn public layouts into manifests: ``demo`` (the bundled real cohort) and ``synthetic``."""

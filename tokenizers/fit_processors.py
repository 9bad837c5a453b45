#!/usr/bin/env python
"""Fit every modality's processor from a manifest and save them (the directory a model is saved into).

    python tokenizers/fit_processors.py --manifest outputs/demo/cohort/manifest.parquet \
        --settings tokenizers/demo_processors.yaml --output_dir outputs/demo/processors

The same as ``bioperceiver fit-processors``: the steps and arguments are documented in
:mod:`bioperceiver.data.fitting`, whose :func:`~bioperceiver.data.fitting.main` this script calls.
"""

from __future__ import annotations

from bioperceiver.data.fitting import main

if __name__ == "__main__":
    main()

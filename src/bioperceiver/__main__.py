"""``python -m bioperceiver``: the ``bioperceiver`` command."""

import sys

from .cli import main

sys.exit(main())

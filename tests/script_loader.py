"""Load a script from the top-level folders (``benchmarks/``, ``finetune/``, ``pretrain/``, ...) as a module, to
call its functions and ``main(argv)`` in-process.

Those folders have no ``__init__.py`` by design (a top-level ``tokenizers`` package would shadow Hugging Face's),
so the tests load scripts from their files. Every call executes the file afresh (a test that monkeypatches one
copy leaves the others alone) and registers the module in ``sys.modules`` under ``name`` first, because dataclasses
(and pickling) look their module up there while the script runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relpath: str, name: str | None = None) -> ModuleType:
    """The script at ``ROOT / relpath`` as a fresh module named ``name`` (default: the file's stem)."""
    path = ROOT / relpath
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    before = sys.modules.get(name)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:  # leave sys.modules as it was (an earlier copy registered under the name stays)
        if before is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = before
        raise
    return module

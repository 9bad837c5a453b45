"""The repository layout contract: script folders are not packages and never shadow Hugging Face's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_script_folders_exist_and_are_not_packages():
    for folder in ("pretrain", "finetune", "tokenizers", "model_cards", "tests", "benchmarks"):
        assert (ROOT / folder).is_dir(), folder
    for folder in ("pretrain", "finetune", "tokenizers", "model_cards", "benchmarks", "tests"):
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py must not exist"
    assert (ROOT / "src" / "bioperceiver" / "__init__.py").is_file()


def test_import_tokenizers_from_repo_root_is_huggingface():
    code = "import tokenizers, sys; print(tokenizers.__file__); print(hasattr(tokenizers, 'Tokenizer'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    path, has_tokenizer = out.stdout.split()
    assert "site-packages" in path and not path.startswith(str(ROOT / "tokenizers"))
    assert has_tokenizer == "True"

"""``refused``: ``run_finetune.main`` refusing a run the way a user sees it (one ``run_finetune.py: error:`` line on
stderr, exit status 2), with the library error that caused it (type and message) checked too."""

from __future__ import annotations

import contextlib
import re

import pytest


class Refusal:
    """The refusal's cause (``value``: the library's exception) and the line printed on stderr (``stderr``)."""

    value: BaseException
    stderr: str


@contextlib.contextmanager
def refused(capsys, match: str, error: type[BaseException] | None = None):
    """Expect ``SystemExit(2)`` from the block, caused by an ``error`` whose message matches ``match``, printed on
    stderr as ``run_finetune.py: error: <message>``; ``error`` defaults to the library's ``FinetuneInputError``."""
    from bioperceiver.training.finetuning import FinetuneInputError

    error = error or FinetuneInputError
    out = Refusal()
    capsys.readouterr()  # only what the block prints
    with pytest.raises(SystemExit) as info:
        yield out
    assert info.value.code == 2
    out.value = info.value.__cause__
    assert isinstance(out.value, error), f"caused by {out.value!r}, not a {error.__name__}"
    assert re.search(match, str(out.value)), f"{match!r} not in {out.value}"
    out.stderr = capsys.readouterr().err
    assert f"run_finetune.py: error: {out.value}" in out.stderr

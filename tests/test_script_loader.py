"""tests/script_loader.py: every call a fresh module, registered under its name; a failed load leaves sys.modules
as it was."""

import sys

import pytest
from script_loader import load_script


def test_fresh_module_per_call_registered_and_restored_on_failure(tmp_path):
    good = tmp_path / "probe_script.py"
    good.write_text("import sys\nSEEN = sys.modules[__name__] is not None\nCOUNT = []\n")
    a = load_script(str(good))  # an absolute path works too
    b = load_script(str(good))
    assert a is not b and a.COUNT is not b.COUNT and a.SEEN  # registered while it ran
    assert sys.modules["probe_script"] is b
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RuntimeError, match="boom"):
        load_script(str(bad), "probe_script")
    assert sys.modules["probe_script"] is b  # the earlier copy stays
    with pytest.raises(RuntimeError, match="boom"):
        load_script(str(bad), "probe_broken_new")
    assert "probe_broken_new" not in sys.modules
    del sys.modules["probe_script"]

"""A CPU pretraining run that starts on cores other processes keep busy says so (timings would be meaningless)."""

from __future__ import annotations

import logging

import pytest

from bioperceiver.training.metering import cpu_load_warning


def test_warns_only_on_a_busy_cpu():
    assert cpu_load_warning("cpu", load=1.2, cores=2) is None  # this process's own start-up
    msg = cpu_load_warning("cpu", load=4.3, cores=2)
    assert msg is not None and "4.3 on 2 cores" in msg and "OMP_NUM_THREADS=1" in msg
    assert cpu_load_warning("cuda", load=40.0, cores=2) is None  # GPU runs: the host load does not set the pace


def test_no_load_average_on_the_platform_is_no_warning(monkeypatch):
    import os

    def unavailable():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert cpu_load_warning("cpu", cores=2) is None


def test_pretraining_logs_the_warning(monkeypatch, caplog, tmp_path):
    """The loop warns before any work when the load is high (the run itself is stopped at the first step)."""
    import bioperceiver.training.loop as loop

    monkeypatch.setattr(loop, "cpu_load_warning", lambda device_type: f"busy {device_type}")

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(loop, "prepare_data", stop)
    from bioperceiver.training.config import load_run_config

    cfg = load_run_config("pretrain/configs/demo.yaml", [f"output_dir={tmp_path}", "logging.report_to=none"])
    with caplog.at_level(logging.WARNING, logger="bioperceiver.training.loop"), pytest.raises(Stop):
        loop.run_pretraining(cfg)
    assert "busy cpu" in caplog.text

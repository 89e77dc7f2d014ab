"""The test seam calls the hook named by LIGHTREASONER_TEST_HOOKS, and does nothing without one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

import fault_hooks
from lightreasoner_ray.io import test_seam


def test_without_a_hook_the_seam_does_nothing(monkeypatch):
    monkeypatch.delenv(test_seam.HOOKS_ENV, raising=False)
    monkeypatch.setenv(fault_hooks.FAULT_ENV, "nan:1")  # parameters alone arm nothing
    value = torch.tensor(2.0)
    assert test_seam.altered("train.micro_batch_loss", value, step=1, rank=0) is value
    test_seam.reached("train.update_started", step=1, rank=0)


def test_the_training_faults_fire_at_their_update_and_rank(monkeypatch, tmp_path):
    fault_hooks.inject(monkeypatch, "nan:3")
    assert test_seam.altered("train.micro_batch_loss", torch.tensor(2.0), step=2, rank=0).item() == 2.0
    assert torch.isnan(test_seam.altered("train.micro_batch_loss", torch.tensor(2.0), step=3, rank=1))

    marker = tmp_path / "failed-once"
    fault_hooks.inject(monkeypatch, f"fail:5:1:{marker}")
    test_seam.reached("train.update_started", step=5, rank=0)
    with pytest.raises(RuntimeError, match="injected worker failure at update 5 on rank 1"):
        test_seam.reached("train.update_started", step=5, rank=1)
    test_seam.reached("train.update_started", step=5, rank=1)  # once only: the marker records it
    assert marker.is_file()
    with pytest.raises(ValueError, match="is not fail"):
        fault_hooks.inject(monkeypatch, "fail:5")


def test_a_hook_may_be_named_by_module_or_by_file(monkeypatch):
    monkeypatch.setenv(fault_hooks.FAULT_ENV, "nan:1")
    for spec in ("fault_hooks:hook", fault_hooks.HOOKS):
        monkeypatch.setenv(test_seam.HOOKS_ENV, spec)
        assert torch.isnan(test_seam.altered("train.micro_batch_loss", torch.tensor(1.0), step=1, rank=0))
    monkeypatch.setenv(test_seam.HOOKS_ENV, "no_function_named")
    with pytest.raises(ValueError, match="is not module:function"):
        test_seam.reached("train.update_started", step=1, rank=0)


def test_a_worker_gets_the_drivers_test_environment(monkeypatch):
    fault_hooks.inject(monkeypatch, "nan:3")
    forwarded = test_seam.forwarded_environment()
    assert forwarded == {test_seam.HOOKS_ENV: fault_hooks.HOOKS, fault_hooks.FAULT_ENV: "nan:3"}
    for name in forwarded:
        monkeypatch.delenv(name)  # a worker process of a cluster started before the test set them
    test_seam.adopt(forwarded)
    assert test_seam.forwarded_environment() == forwarded


def test_the_kill_hook_kills_the_process_after_its_nth_file():
    script = ("from lightreasoner_ray.io.test_seam import reached\n"
              "for files in range(1, 5):\n"
              "    reached('sampling.file_written', files=files)\n"
              "    print(files, flush=True)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **fault_hooks.kill_after_files(2)})
    assert result.returncode == -signal.SIGKILL and result.stdout.split() == ["1"]

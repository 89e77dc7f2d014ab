"""CPU training workers give freed tensors back to the system (host_memory.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lightreasoner_ray.stages.training import host_memory

# Frees 100 MB of 256 KB tensors in a process whose glibc has raised its mmap threshold (a
# 32 MB block was freed first, as a training step does), one small tensor allocated after
# them pinning the top of the heap; prints how much anonymous memory stayed resident.
_SCRIPT = textwrap.dedent("""
    import re, sys
    from pathlib import Path
    import torch
    from lightreasoner_ray.stages.training.host_memory import return_freed_memory

    def anon():
        return int(re.search(r"RssAnon:\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    if sys.argv[1] == "fixed":
        assert return_freed_memory()
    big = torch.ones(8 << 20)
    del big
    before = anon()
    kept = [torch.ones(64 * 1024) for _ in range(400)]
    pin = torch.ones(64 * 1024)
    del kept
    print(anon() - before)
""")


def _retained_bytes(mode: str) -> int:
    env = {key: value for key, value in os.environ.items() if key != host_memory.ENV_OVERRIDE}
    done = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_memory.glibc(), reason="glibc's allocator only")
def test_freed_tensors_go_back_to_the_system():
    retained_default = _retained_bytes("default")
    retained_fixed = _retained_bytes("fixed")
    # Negative control: glibc's default keeps the freed 100 MB resident ...
    assert retained_default > 80e6, retained_default
    # ... and with the fixed threshold it is returned.
    assert retained_fixed < 10e6, retained_fixed


def test_a_users_own_setting_wins(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_OVERRIDE, "1048576")
    assert host_memory.return_freed_memory() is False


def test_nothing_is_done_outside_linux(monkeypatch):
    monkeypatch.delenv(host_memory.ENV_OVERRIDE, raising=False)
    monkeypatch.setattr(host_memory.sys, "platform", "darwin")
    assert host_memory.return_freed_memory() is False

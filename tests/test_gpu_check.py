"""bench/gpu_check.py at tiny shapes on the CPU (bf16 CPU vs fp32 CPU), so the GPU check cannot rot.

It runs in a subprocess where Ray, pyarrow, DeepSpeed, vLLM and
math-verify cannot be imported: the packages a one-GPU machine with only torch, transformers and peft lacks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ["ray", "pyarrow", "deepspeed", "vllm", "math_verify"]
RUNNER = """
import sys
BLOCKED = {blocked!r}
# As if not installed: `import x` raises ImportError and importlib.util.find_spec("x") is None.
for name in BLOCKED:
    sys.modules[name] = None
sys.argv = ["bench/gpu_check.py"] + {argv!r}
import runpy
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:
    leaked = sorted(name for name, module in sys.modules.items() if name.split(".")[0] in BLOCKED and module is not None)
    print("LEAKED", leaked, file=sys.stderr)
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu_check_models")


def run_check(models: Path, tmp_path: Path, *extra: str, blocked=BLOCKED):
    report = tmp_path / "report.json"
    argv = ["--device", "cpu", "--shape", "tiny", "--models", str(models), "--json", str(report), *extra]
    code = RUNNER.format(blocked=blocked, argv=argv, script=str(ROOT / "bench" / "gpu_check.py"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    return done, (json.loads(report.read_text()) if report.exists() else None)


@pytest.mark.slow  # ~10-25 s: two model loads and a bf16 LM head at the real vocabulary on CPU
def test_gpu_check_passes_at_tiny_shapes_without_ray_pyarrow_deepspeed_vllm(models, tmp_path):
    done, report = run_check(models, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "LEAKED []" in done.stderr
    assert "PASS" in done.stdout
    pieces = {row["piece"]: row for row in report["rows"]}
    contrast = pieces["contrast (KL, selection)"]
    assert contrast["positions"] > 0 and contrast["selection_agreement"] >= 0.99
    assert 0 < contrast["kl_mean_abs_diff"] <= 0.02  # bf16 is not fp32: a real, small difference
    lora = pieces["LoRA update (loss, grads, AdamW)"]
    assert 0.99 <= lora["gradient_cosine"] < 1.0 and lora["parameters_changed"] > 0
    assert pieces["DeepSpeed ZeRO-2 step"]["status"] == "skipped"  # blocked, so skipped, not failed


@pytest.mark.slow
def test_an_injected_mismatch_makes_it_exit_non_zero(models, tmp_path):
    done, report = run_check(models, tmp_path, "--perturb", "0.05")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL" in done.stdout
    failed = {row["piece"] for row in report["rows"] if not row["ok"]}
    assert {"contrast (KL, selection)", "LoRA update (loss, grads, AdamW)"} <= failed


def test_no_cuda_is_a_one_line_error(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cuda", "--shape", "tiny",
                           "--models", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("gpu_check: error: --device cuda")


@pytest.mark.slow
def test_the_deepspeed_zero2_step_runs_where_deepspeed_is_installed(models, tmp_path):
    pytest.importorskip("deepspeed")
    done, report = run_check(models, tmp_path, blocked=["ray", "pyarrow", "vllm", "math_verify"])
    assert done.returncode == 0, done.stdout + done.stderr
    step = {row["piece"]: row for row in report["rows"]}["DeepSpeed ZeRO-2 step"]
    assert step["status"] == "ok" and step["parameters_changed"] > 0


def test_its_import_chain_needs_no_ray_pyarrow_deepspeed_vllm():
    """Fast: importing the check (core, engines, toy.real_shapes, peft) with those packages absent."""
    code = (f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n"
            f"sys.path.insert(0, {str(ROOT / 'bench')!r})\nimport gpu_check\nimport peft\n"
            f"print(sorted(n for n, m in sys.modules.items() if n.split('.')[0] in {BLOCKED!r} and m is not None))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"

"""Checkpoints after faults: a damaged latest checkpoint, a worker killed in the middle of a save.

Runs are the tiny expert's LoRA training under ZeRO-3 on 2 workers (Ray Train, CPU, gloo),
16 updates with a checkpoint every 8 and two kept. Kills go through
``lightreasoner_ray.io.test_seam`` (:func:`kill_hook` below, loaded in the workers by path).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.stages.training.checkpoints import COMPLETE_MARKER, TRAIN_STATE_FILE, checkpoint_problem
try:
    from test_training import sampled, train_config  # noqa: F401 (sampled: the samples fixture)
except ImportError:  # loaded by path in a Ray Train worker, for kill_hook alone
    pass

HOOKS_ENV = "LIGHTREASONER_TEST_HOOKS"
KILL_ENV = "LIGHTREASONER_TEST_KILL_SAVE"  # <step>:<rank>:<marker file>


def kill_hook(point: str, **details) -> None:
    """SIGKILL the worker of rank ``rank`` once, after it wrote its files of update ``step``'s checkpoint, before its marker."""
    spec = os.environ.get(KILL_ENV)
    if not spec or point != "train.checkpoint_written":
        return None
    step, rank, marker = spec.split(":", 2)
    if (details["step"], details["rank"]) == (int(step), int(rank)) and not Path(marker).exists():
        Path(marker).write_text(f"killed while saving update {step} on rank {rank}\n")
        os.kill(os.getpid(), signal.SIGKILL)
    return None


def run_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints" / "train"


def config_for(tiny_pair, sampled, output_dir, *overrides):
    return train_config(tiny_pair, output_dir, sampled["dir"], "train.deepspeed.stage=3", "train.checkpoint_every=8",
                        "train.keep_checkpoints=2", "train.max_failures=0", *overrides)


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def assert_same_adapter(left: Path, right: Path) -> None:
    a, b = adapter_tensors(left), adapter_tensors(right)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def undisturbed(tiny_pair, sampled, ray_local, tmp_path_factory):
    """An undisturbed 16-update run; its published adapter copied aside before any test touches the run."""
    from lightreasoner_ray.stages.training.driver import run_training

    output_dir = tmp_path_factory.mktemp("undisturbed")
    summary = run_training(config_for(tiny_pair, sampled, output_dir))
    reference = tmp_path_factory.mktemp("reference") / "model"
    shutil.copytree(output_dir / "model", reference)
    return {"output_dir": output_dir, "summary": summary, "reference": reference}


@pytest.mark.slow
def test_every_kept_checkpoint_is_marked_complete_by_every_worker(undisturbed):
    kept = sorted(p.name for p in run_dir(undisturbed["output_dir"]).iterdir() if p.name.startswith("step_"))
    assert kept == ["step_0000008", "step_0000016"]
    for name in kept:
        directory = run_dir(undisturbed["output_dir"]) / name
        markers = [json.loads((directory / COMPLETE_MARKER.format(rank=r)).read_text()) for r in (0, 1)]
        assert [m["world_size"] for m in markers] == [2, 2]
        assert TRAIN_STATE_FILE in markers[0]["files"]
        assert checkpoint_problem(str(directory), 0) is None and checkpoint_problem(str(directory), 1) is None


@pytest.mark.slow
def test_a_complete_checkpoint_ray_train_never_registered_is_resumed_from(tiny_pair, sampled, undisturbed, tmp_path):
    """A node lost after every worker finished update 8's checkpoint but before Ray Train registered it: the
    run holds the complete step_0000008 and no Ray Train record of it. The re-run resumes from update 8 (not
    from scratch) and ends with the undisturbed run's adapter."""
    from lightreasoner_ray.io.layout import RunLayout
    from lightreasoner_ray.stages.training.driver import run_training

    source = undisturbed["output_dir"]
    output_dir = tmp_path / "run"
    shutil.copytree(run_dir(source) / "step_0000008", run_dir(output_dir) / "step_0000008")
    shutil.copy(RunLayout(str(source)).checkpoints_provenance, RunLayout(str(output_dir)).checkpoints_provenance)
    assert not (run_dir(output_dir) / "checkpoint_manager_snapshot.json").exists()  # Ray Train registered nothing

    summary = run_training(config_for(tiny_pair, sampled, output_dir))
    assert summary["resumed_from_step"] == 8 and summary["steps"] == 16
    assert_same_adapter(output_dir / "model", undisturbed["reference"])


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_to_the_older_one(tiny_pair, sampled, undisturbed):
    """Garble (same size) a file of update 16's checkpoint that only worker 1 reads: every rank falls back
    to update 8 and the re-run ends where the undisturbed run from that checkpoint ended."""
    from lightreasoner_ray.stages.training.driver import run_training

    output_dir = undisturbed["output_dir"]
    latest = run_dir(output_dir) / "step_0000016"
    target = next(p for p in (latest / "deepspeed").iterdir() if p.name.startswith("zero_pp_rank_1"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    target.write_bytes(bytes(data))
    assert "differs" in checkpoint_problem(str(latest), 1)

    summary = run_training(config_for(tiny_pair, sampled, output_dir))
    assert summary["resumed_from_step"] == 8 and summary["steps"] == 16
    assert latest.is_dir()  # the damaged checkpoint is left in place, not mixed into
    assert Path(summary["checkpoint"]).name == "step_0000016-2"
    assert_same_adapter(output_dir / "model", undisturbed["reference"])


@pytest.mark.slow
def test_a_single_damaged_checkpoint_is_one_line_naming_the_directory_to_delete(tiny_pair, sampled, ray_local,
                                                                                 tmp_path):
    from lightreasoner_ray.stages.training.driver import run_training

    run_training(config_for(tiny_pair, sampled, tmp_path, "train.max_steps=8"))
    only = run_dir(tmp_path) / "step_0000008"
    target = next(p for p in (only / "deepspeed").iterdir() if p.name.startswith("zero_pp_rank_0"))
    target.write_bytes(target.read_bytes()[:100])  # truncated
    with pytest.raises(LightReasonerError) as error:
        run_training(config_for(tiny_pair, sampled, tmp_path))
    message = str(error.value)
    assert "\n" not in message
    assert "step_0000008" in message and f"delete {run_dir(tmp_path)}" in message and "--restart" in message


@pytest.mark.slow
def test_a_worker_killed_mid_save_leaves_no_complete_looking_checkpoint_and_a_rerun_completes(
    tiny_pair, sampled, undisturbed, monkeypatch, tmp_path
):
    from lightreasoner_ray.stages.training.driver import run_training

    monkeypatch.setenv(HOOKS_ENV, f"{Path(__file__).resolve()}:kill_hook")
    monkeypatch.setenv(KILL_ENV, f"16:1:{tmp_path / 'killed'}")
    output_dir = tmp_path / "run"
    with pytest.raises(LightReasonerError):
        run_training(config_for(tiny_pair, sampled, output_dir))
    assert (tmp_path / "killed").is_file()
    for directory in run_dir(output_dir).iterdir():
        if directory.name.startswith("step_0000016"):
            # Whatever worker 0 got out before worker 1 died is not a complete checkpoint.
            assert checkpoint_problem(str(directory), 0) is not None

    summary = run_training(config_for(tiny_pair, sampled, output_dir))
    assert summary["resumed_from_step"] == 8 and summary["steps"] == 16
    assert checkpoint_problem(summary["checkpoint"], 0) is None
    assert_same_adapter(output_dir / "model", undisturbed["reference"])


# Fast checks of the pieces, without Ray.

def _write_rank_files(directory: Path, rank: int, files: dict[str, bytes]) -> None:
    from lightreasoner_ray.stages.training.checkpoints import write_completion_marker

    scratch = directory.parent / f"rank{rank}-scratch"
    scratch.mkdir()
    for name, data in files.items():
        (scratch / name).parent.mkdir(parents=True, exist_ok=True)
        (scratch / name).write_bytes(data)
    write_completion_marker(str(scratch), rank, 2, 8)
    for path in scratch.rglob("*"):  # what Ray Train does: every rank's files land in one directory
        if path.is_file():
            (directory / path.relative_to(scratch)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, directory / path.relative_to(scratch))


def test_completion_markers_catch_a_missing_worker_a_missing_file_truncation_and_alteration(tmp_path):
    checkpoint = tmp_path / "step_0000008"
    checkpoint.mkdir()
    _write_rank_files(checkpoint, 0, {TRAIN_STATE_FILE: b'{"step": 8}', "deepspeed/zero_pp_rank_0.pt": b"a" * 100})
    assert checkpoint_problem(str(checkpoint), 0) == "no completion marker from worker 1 (an interrupted save)"
    _write_rank_files(checkpoint, 1, {"deepspeed/zero_pp_rank_1.pt": b"b" * 100})
    assert checkpoint_problem(str(checkpoint), 0) is None and checkpoint_problem(str(checkpoint), 1) is None

    own = checkpoint / "deepspeed" / "zero_pp_rank_1.pt"
    own.write_bytes(b"b" * 50 + b"c" + b"b" * 49)  # same size, altered: only the rank that reads it hashes it
    assert checkpoint_problem(str(checkpoint), 0) is None
    assert checkpoint_problem(str(checkpoint), 1) == "deepspeed/zero_pp_rank_1.pt differs from what was written"
    own.write_bytes(b"b" * 10)
    assert "has 10 bytes, 100 were written" in checkpoint_problem(str(checkpoint), 0)
    own.unlink()
    assert checkpoint_problem(str(checkpoint), 0) == "deepspeed/zero_pp_rank_1.pt is missing"


def test_a_checkpoint_without_markers_is_accepted_only_as_ray_trains_latest(tmp_path):
    (tmp_path / TRAIN_STATE_FILE).write_text('{"step": 8}')
    assert checkpoint_problem(str(tmp_path), 0, legacy_ok=True) is None
    assert "no completion marker" in checkpoint_problem(str(tmp_path), 0)
    (tmp_path / TRAIN_STATE_FILE).unlink()
    assert checkpoint_problem(str(tmp_path), 0, legacy_ok=True) == f"no {TRAIN_STATE_FILE}"


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["LIGHTREASONER_TEST_PWNED"]),))


def test_deepspeed_checkpoint_files_are_read_without_running_code(tmp_path, monkeypatch):
    """A checkpoint file whose pickle names a callable (here: touch a file) is refused while DeepSpeed loads it."""
    import pickle
    from types import SimpleNamespace

    from lightreasoner_ray.stages.training.checkpoints import _weights_only_loading

    pwned = tmp_path / "pwned"
    monkeypatch.setenv("LIGHTREASONER_TEST_PWNED", str(pwned))
    malicious = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": _Payload()}, malicious)
    pickle.loads(pickle.dumps(_Payload()))  # the payload does run when unpickled unrestricted
    assert pwned.exists()
    pwned.unlink()

    def unrestricted(path, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=False)

    engine = SimpleNamespace(checkpoint_engine=SimpleNamespace(load=unrestricted))
    with _weights_only_loading(engine):
        with pytest.raises(pickle.UnpicklingError):
            engine.checkpoint_engine.load(str(malicious), map_location="cpu")
    assert not pwned.exists()
    assert engine.checkpoint_engine.load is unrestricted  # restored afterwards

    plain = tmp_path / "plain.pt"
    torch.save({"module": {"w": torch.ones(2)}, "step": 3}, plain)
    with _weights_only_loading(engine):
        assert engine.checkpoint_engine.load(str(plain), map_location="cpu")["step"] == 3


def test_resume_candidates_are_every_step_checkpoint_newest_first_with_or_without_ray_trains_latest(tmp_path):
    """Without a registered checkpoint the run's step_* folders are the candidates; with one, it is among them
    in step order (a later unregistered checkpoint comes first)."""
    from ray.train import Checkpoint

    from lightreasoner_ray.stages.training.checkpoints import _candidates

    for name in ("step_0000004", "step_0000008", "step_0000008-2", "step_0000008-final", "notes", "step_x"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_0000012").write_text("a file, not a checkpoint")
    names = [Path(c.path).name for c in _candidates(None, str(tmp_path))]
    assert names == ["step_0000008-final", "step_0000008-2", "step_0000008", "step_0000004"]
    assert list(_candidates(None, str(tmp_path / "absent"))) == [] and list(_candidates(None, None)) == []

    latest = Checkpoint(path=str(tmp_path / "step_0000004"))
    listed = list(_candidates(latest, str(tmp_path)))
    assert [Path(c.path).name for c in listed] == names
    assert listed[-1] is latest  # Ray Train's own object, so it is recognised as registered

"""`lightreasoner run ... rounds=N`: each round samples fresh problems with the previous round's merged expert."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lightreasoner_ray.config import DataConfig, load_config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.data.problems import load_problems
from lightreasoner_ray.runs.rounds import check_rounds_config, round_config

from conftest import DATA_DIR, REPO_ROOT, gsm8k_rows
import fault_hooks

TINY = REPO_ROOT / "configs" / "tiny.yaml"


def test_rounds_need_a_limit_and_at_least_one_round():
    with pytest.raises(LightReasonerError, match="rounds must be >= 1"):
        load_config(TINY, ["rounds=0"])
    with pytest.raises(LightReasonerError, match="needs data.limit"):
        load_config(TINY, ["rounds=2", "data.limit=null"])


def test_rounds_refuse_fixed_samples_or_models():
    with pytest.raises(LightReasonerError, match="train.samples"):
        check_rounds_config(load_config(TINY, ["rounds=2", "train.samples=/s"]))
    with pytest.raises(LightReasonerError, match="eval.models"):
        check_rounds_config(load_config(TINY, ["rounds=2", "eval.models=[a=/m]"]))


def test_each_round_gets_its_own_directory_expert_and_fresh_problems(problems_file):
    config = load_config(TINY, ["rounds=3", "data.limit=4", "data.offset=1", "data.shuffle=false", "output_dir=/o",
                                f"data.problems={problems_file}", "export.output=/elsewhere"])
    first, third = round_config(config, 1, "/m/expert"), round_config(config, 3, "/o/round-2/merged")
    assert (first.output_dir, first.expert.path, first.data.offset) == ("/o", "/m/expert", 1)
    assert (third.output_dir, third.expert.path, third.data.offset) == ("/o/round-3", "/o/round-2/merged", 9)
    assert third.export.output == "" and third.rounds == 1
    questions = [row["question"] for row in gsm8k_rows(12)]
    loaded = load_problems(third.data).problems
    assert [p["question"] for p in loaded] == questions[9:12]  # only 3 left after skipping 9


def test_offset_past_the_end_is_refused(problems_file):
    with pytest.raises(LightReasonerError, match="data.offset=12 skips all 12 problems"):
        load_problems(DataConfig(problems=str(problems_file), offset=12, limit=4))


def _cli(overrides: list[str], ray_address: str, kill_after_files: int | None = None) -> int:
    # Each run attaches to the session's Ray instance, as a job on a cluster does: three fresh local
    # instances cost minutes, and time out starting on a crowded machine.
    env = dict(os.environ, RAY_ADDRESS=ray_address, LIGHTREASONER_NO_DASHBOARD="1")
    env.pop("LIGHTREASONER_TEST_HOOKS", None)
    env.pop(fault_hooks.KILL_AFTER_FILES_ENV, None)
    if kill_after_files is not None:
        env.update(fault_hooks.kill_after_files(kill_after_files))
    process = subprocess.Popen([sys.executable, "-m", "lightreasoner_ray.cli", "run", "--config", str(TINY), *overrides],
                               env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, stderr = process.communicate(timeout=900)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # anything the driver started in its session
        except ProcessLookupError:
            pass
    if process.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"lightreasoner run failed ({process.returncode}):\n{stderr.decode()[-3000:]}")
    return process.returncode


def _fingerprint(directory: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``directory`` (round directories excluded): mtime and content hash."""
    return {str(path.relative_to(directory)): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            for path in sorted(directory.rglob("*"))
            # Round directories aside, logs/ (every invocation writes its own log file there) and the
            # output_dir lock (every invocation takes it).
            if path.is_file() and not path.relative_to(directory).parts[0].startswith(("round-", "logs"))
            and path.name != ".lightreasoner.lock"}


@pytest.mark.slow
def test_two_rounds_through_the_cli_resume_after_a_kill_in_round_two(tiny_pair, problems_file, tmp_path, ray_local):
    address = ray_local.get_runtime_context().gcs_address
    out = tmp_path / "run"
    overrides = [
        f"expert.path={tiny_pair['expert']}", f"amateur.path={tiny_pair['amateur']}", f"data.problems={problems_file}",
        "data.limit=4", "data.shuffle=false", "sampling.beta=0.0", "sampling.max_new_tokens=12",
        "sampling.batch_size=1", "sampling.rows_per_file=1", "sampling.num_actors=1", "train.max_steps=2",
        "train.checkpoint_every=2", "train.num_workers=1", "eval.benchmarks=[gsm8k]", "eval.limit=2",
        "eval.max_new_tokens=8", "eval.num_actors=1", f"eval.data_dir={DATA_DIR}", "ray.num_cpus=2",
        f"output_dir={out}",
    ]
    # One round: today's layout, nothing of rounds.
    assert _cli([*overrides, "rounds=1"], address) == 0
    assert (out / "model" / "adapter_config.json").is_file() and not (out / "rounds.json").exists()

    # Two rounds, the job killed after round 2's second sample file: round 1's stages resume
    # (nothing to sample, training finished), its adapter is merged, round 2 starts.
    assert _cli([*overrides, "rounds=2"], address, kill_after_files=2) == -signal.SIGKILL
    round_two = out / "round-2"
    assert len(list((round_two / "samples").glob("*.parquet"))) == 2
    assert (out / "round_done.json").is_file() and not (round_two / "round_done.json").exists()
    round_one_files = _fingerprint(out)

    assert _cli([*overrides, "rounds=2"], address) == 0
    # Round 1 was skipped whole: not a file of it was rewritten.
    assert {name: value for name, value in _fingerprint(out).items() if not name.startswith("rounds.")} == round_one_files
    summary = json.loads((round_two / "samples_summary.json").read_text())
    assert summary["counts"]["resumed_problems"] == 2 and summary["counts"]["problems"] == 4
    assert summary["models"]["expert"] == str(out / "merged")
    assert summary["models"]["amateur"] == str(tiny_pair["amateur"])
    # Fresh problems: round 2 sampled rows 4..7 of the problem file, round 1 rows 0..3.
    questions = [row["question"] for row in gsm8k_rows(12)]
    def sampled_ids(directory: Path) -> list[str]:
        return sorted(pq.read_table(directory / "samples", columns=["problem_id"]).column("problem_id").to_pylist())
    from lightreasoner_ray.data.problems import question_hash
    assert sampled_ids(out) == sorted(question_hash(q) for q in questions[0:4])
    assert sampled_ids(round_two) == sorted(question_hash(q) for q in questions[4:8])  # no duplicates either
    # Round 2 trained an adapter on the merged round-1 expert.
    adapter = json.loads((round_two / "model" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(out / "merged")
    assert (out / "merged" / "config.json").is_file()

    rounds = json.loads((out / "rounds.json").read_text())["rounds"]
    assert [row["round"] for row in rounds] == [1, 2]
    assert [row["expert"] for row in rounds] == [str(tiny_pair["expert"]), str(out / "merged")]
    for row, directory in zip(rounds, (out, round_two)):
        counts = json.loads((directory / "samples_summary.json").read_text())["counts"]
        assert row["tuned_tokens"] == counts["selected_steps"] > 0 and row["problems_sampled"] == 4
        predictions = [json.loads(line) for line in (directory / "eval" / "lightreasoner" / "gsm8k.jsonl").read_text().splitlines()]
        assert len(predictions) == 2
        assert row["accuracy"]["gsm8k"] == sum(bool(p["correct"]) for p in predictions) / len(predictions)
    assert rounds[0]["baseline_accuracy"] is not None and rounds[1]["baseline_accuracy"] is None
    markdown = (out / "rounds.md").read_text()
    assert "after round 1" in markdown and "after round 2" in markdown and "expert (before round 1)" in markdown


def test_growing_rounds_continues_from_the_last_finished_rounds_model(problems_file, tmp_path, monkeypatch):
    """rounds=2 finished, then rounds=3: round 3 samples with round 2's merged model, never an empty path."""
    import lightreasoner_ray.runs.rounds as rounds

    ran: list[tuple[str, str]] = []
    merged: list[str] = []

    def fake_round(config, eval_models=None):
        ran.append((config.output_dir, config.expert.path))
        return {}

    def fake_next_expert(config, reuse=False):
        merged.append(config.output_dir)
        return str(Path(config.output_dir, "merged"))

    monkeypatch.setattr(rounds, "run_round", fake_round)
    monkeypatch.setattr(rounds, "next_expert", fake_next_expert)
    monkeypatch.setattr(rounds, "round_row", lambda number, config, report, wall: {"round": number})
    monkeypatch.setattr(rounds, "rounds_markdown", lambda summary: "")
    common = ["data.limit=4", "data.shuffle=false", f"data.problems={problems_file}", f"output_dir={tmp_path}",
              "expert.path=/m/expert"]
    rounds.run_rounds(load_config(TINY, ["rounds=2", *common]))
    assert [expert for _, expert in ran] == ["/m/expert", str(tmp_path / "merged")]
    ran.clear()
    rounds.run_rounds(load_config(TINY, ["rounds=3", *common]))
    # Rounds 1 and 2 are skipped; round 2's model is merged now (it was the last round before) and used.
    assert ran == [(str(tmp_path / "round-3"), str(tmp_path / "round-2" / "merged"))]
    assert merged[-1] == str(tmp_path / "round-2")
    recorded = json.loads((tmp_path / "round-2" / "round_done.json").read_text())
    assert recorded["next_expert"] == str(tmp_path / "round-2" / "merged")


def test_a_round_finished_before_newer_settings_existed_is_still_skipped_whole(tmp_path):
    """round_done.json written by a version without the loss/rollout/export keys: the round is finished for a
    config that leaves them at their defaults, and not for one that sets one of them."""
    import json

    from lightreasoner_ray.config import load_config
    from lightreasoner_ray.runs.rounds import _finished_round, round_record

    config = load_config(None, [f"output_dir={tmp_path}"])
    record = round_record(config, {"round": 1}, "/experts/round1")
    record.write()
    stored = json.loads(Path(record.path).read_text())
    for section, key in (("train", "divergence"), ("train", "anchor_weight"), ("sampling", "temperature"),
                         ("export", "push_to_hub"), ("demo", "pair_seed")):
        del stored["settings"][section][key]
    Path(record.path).write_text(json.dumps(stored))
    assert _finished_round(config)["next_expert"] == "/experts/round1"
    assert _finished_round(load_config(None, [f"output_dir={tmp_path}", "train.divergence=jsd"])) is None
    assert _finished_round(load_config(None, [f"output_dir={tmp_path}", "train.lr=1e-3"])) is None

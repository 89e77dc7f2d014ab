"""The demo's bookkeeping without Ray: its output_dir guard, its checks, its slips and its table."""

import dataclasses
from pathlib import Path
import json

import pytest

from lightreasoner_ray.io.layout import DEMO_SETTINGS as SETTINGS_FILE
from lightreasoner_ray.runs.demo import check_demo_config, claim_output_dir, demo_config
from lightreasoner_ray.runs.demo_report import demo_markdown, demo_report, hasty_slips
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.toy import generate_problems


def test_same_settings_resume_and_seeds_may_be_added(tmp_path):
    claim_output_dir(demo_config([f"output_dir={tmp_path}"]), "pair-a")
    written = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert written["toy_pair"] == "pair-a" and written["train.lr"] == 2e-4
    claim_output_dir(demo_config([f"output_dir={tmp_path}"]), "pair-a")
    claim_output_dir(demo_config([f"output_dir={tmp_path}", "demo.seeds=[0,7]"]), "pair-a")
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == written


def test_options_may_be_added_with_their_settings(tmp_path):
    """An option's own settings (demo.anchor_weight, demo.rollout_*) are read by its variants alone, which
    keep their own records: adding options with them resumes the directory, and the record shows them."""
    claim_output_dir(demo_config([f"output_dir={tmp_path}"]), "pair-a")
    (tmp_path / "all_steps").mkdir()
    options = ["demo.options=[anchor,sampled_rollouts]", "demo.anchor_weight=0.25", "demo.rollout_temperature=1.0",
               "demo.rollout_top_p=0.9"]
    claim_output_dir(demo_config([f"output_dir={tmp_path}", *options]), "pair-a")
    written = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert (written["demo.anchor_weight"], written["demo.rollout_temperature"], written["demo.rollout_top_p"]) == (0.25, 1.0, 0.9)
    # Any other setting still refuses, beside the options.
    with pytest.raises(LightReasonerError, match="train.jsd_beta differ"):
        claim_output_dir(demo_config([f"output_dir={tmp_path}", *options, "train.jsd_beta=0.3"]), "pair-a")


def test_a_record_written_before_the_newer_settings_still_resumes(tmp_path):
    """A demo directory from before demo.pair_seed, the loss and rollout options and the export keys: it resumes
    (the newer keys are recorded then)."""
    newer = {"demo.pair_seed", "sampling.temperature", "sampling.top_p", "sampling.seed", "train.divergence",
             "train.jsd_beta", "train.anchor_weight", "export.merge", "export.push_to_hub"}

    claim_output_dir(demo_config([f"output_dir={tmp_path}"]), "pair-a")
    (tmp_path / "all_steps").mkdir()
    record = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert {"export.merge", "demo.pair_seed", "train.divergence"} <= set(record)
    older = {key: value for key, value in record.items() if key not in newer}
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(older))
    claim_output_dir(demo_config([f"output_dir={tmp_path}"]), "pair-a")
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == record
    with pytest.raises(LightReasonerError, match="demo.pair_seed differ"):
        claim_output_dir(demo_config([f"output_dir={tmp_path}", "demo.pair_seed=1"]), "pair-a")


@pytest.mark.parametrize("overrides, pair, named", [
    (["train.lr=1e-3"], "pair-a", "train.lr"),
    (["demo.test_problems=50"], "pair-a", "demo.test_problems"),
    ([], "pair-b", "toy_pair"),
])
def test_other_settings_are_refused_naming_what_changed(tmp_path, overrides, pair, named):
    claim_output_dir(demo_config([f"output_dir={tmp_path}"]), "pair-a")
    with pytest.raises(LightReasonerError, match=rf"holds a demo run with other settings \({named} differ"):
        claim_output_dir(demo_config([f"output_dir={tmp_path}", *overrides]), pair)


def test_a_non_empty_directory_without_settings_is_refused(tmp_path):
    (tmp_path / "all_steps").mkdir()
    with pytest.raises(LightReasonerError, match="holds no demo_settings.json"):
        claim_output_dir(demo_config([f"output_dir={tmp_path}"]), "pair-a")


@pytest.mark.parametrize("overrides, message", [
    (["output_dir=s3://bucket/demo"], "must be a local directory"),
    (["eval.benchmarks=[gsm8k]"], r"eval.benchmarks must be \[toy\]"),
    (["demo.seeds=[0,0]"], "demo.seeds has repeats"),
])
def test_demo_config_checks(overrides, message):
    with pytest.raises(LightReasonerError, match=message):
        check_demo_config(demo_config(overrides))


def _write_predictions(config, tag, outputs, test_rows):
    directory = config.output_dir + f"/eval/{tag}"
    import os

    os.makedirs(directory, exist_ok=True)
    with open(f"{directory}/toy.jsonl", "w") as handle:
        for row, output in zip(test_rows, outputs):
            boxed = output.rsplit("boxed{", 1)[-1].split("}")[0] if "boxed{" in output else ""
            handle.write(json.dumps({"id": row["id"], "question": row["question"], "output": output,
                                     "extracted": boxed, "answer": row["answer"],
                                     "correct": boxed == row["answer"]}) + "\n")


def test_slips_and_report_from_made_up_predictions(tmp_path):
    test_rows = generate_problems(40, seed=2000, split="test")
    scaling = [row for row in test_rows if row["solution"].split("\n")[-2].split()[1] == "*"
               and len(row["solution"].split("\n")) >= 3]
    assert len(scaling) >= 3
    before_scaling = {row["id"]: row["solution"].split("\n")[-3].split(" = ")[1] for row in scaling}

    def outputs(slip_ids, wrong_others=0):
        texts, wrong = [], 0
        for row in test_rows:
            if row["id"] in slip_ids:
                texts.append(f"... The answer is \\boxed{{{before_scaling[row['id']]}}}.")
            elif row["id"] not in before_scaling and wrong < wrong_others:
                wrong += 1
                texts.append("The answer is \\boxed{1000}.")
            else:
                texts.append(row["solution"])
        return texts

    ids = [row["id"] for row in scaling]
    config = demo_config([f"output_dir={tmp_path}"])
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, models=[
        "amateur=a", "expert=e", "lightreasoner-seed0=x", "lightreasoner-seed1=y"]))
    _write_predictions(config, "amateur", outputs(set(ids)), test_rows)
    _write_predictions(config, "expert", outputs(set(ids[:2])), test_rows)
    _write_predictions(config, "lightreasoner-seed0", outputs(set(), wrong_others=4), test_rows)
    _write_predictions(config, "lightreasoner-seed1", outputs(set(ids[:1]), wrong_others=2), test_rows)

    slips = hasty_slips(config, test_rows)
    n = len(ids)
    assert slips["amateur"]["rate"] == 1.0 and slips["expert"]["rate"] == 2 / n
    assert slips["lightreasoner-seed0"] == {"rate": 0.0, "ending_in_scaling": {"problems": n, "correct": n},
                                            "others": {"problems": 40 - n, "correct": 40 - n - 4}}
    assert slips["lightreasoner-seed1"]["ending_in_scaling"]["correct"] == n - 1

    accuracy = {tag: (sum(s[k]["correct"] for k in ("ending_in_scaling", "others")) / 40) for tag, s in slips.items()}
    results = {"models": {tag: {"benchmarks": {"toy": {"accuracy": a}}} for tag, a in accuracy.items()}}
    runs = {"lightreasoner": [{"seed": s, "model": "m", "tuned_tokens": 7, "train_time_s": t, "resumed": False}
                              for s, t in ((0, 10.0), (1, 20.0))],
            "sft": [], "random_steps": []}
    for name in ("sft", "random_steps"):  # same shape, so the report has every row
        runs[name] = [dict(run) for run in runs["lightreasoner"]]
        for run in runs[name]:
            results["models"][f"{name}-seed{run['seed']}"] = results["models"][f"lightreasoner-seed{run['seed']}"]
    sampled = [{"completion_ids": [1, 2, 3]}] * 5
    config = dataclasses.replace(config, demo=dataclasses.replace(config.demo, seeds=[0, 1]))
    report = demo_report(config, _Pair(), results, runs, sampled, {"sample": 4.0}, 7, slips)
    row = {r["model"]: r for r in report["rows"]}["lightreasoner"]
    a0, a1 = accuracy["lightreasoner-seed0"], accuracy["lightreasoner-seed1"]
    assert row["accuracies"] == [a0, a1] and row["accuracy_mean"] == pytest.approx((a0 + a1) / 2)
    assert row["accuracy_std"] == pytest.approx(abs(a0 - a1) / 2 ** 0.5)  # sample std of two values
    assert row["hasty_slip_rate"] == pytest.approx((0 + 1 / n) / 2)
    assert row["wall_time_s"] == 4.0 + 15.0 and row["problems_used"] == 5 and row["tuned_tokens"] == 7
    assert [s["rate"] for s in row["slips"]] == [0.0, 1 / n]
    markdown = demo_markdown(report)
    assert f"| expert + LightReasoner | {100 * (a0 + a1) / 2:.1f} ± {100 * abs(a0 - a1) / 2 ** 0.5:.1f} |" in markdown
    assert "(resumed)" not in markdown
    assert "Toy pair" not in markdown  # no fingerprint given, none claimed

    report = demo_report(config, _Pair(), results, runs, sampled, {"sample": 4.0}, 7, slips,
                         fingerprint="abc-123", machine="Some CPU, torch 9, 2 threads")
    assert report["toy_pair"]["fingerprint"] == "abc-123" and report["toy_pair"]["machine"].startswith("Some CPU")
    assert "Toy pair abc-123, on Some CPU, torch 9, 2 threads." in demo_markdown(report)


def test_the_machine_description_names_the_cpu_torch_and_threads():
    import torch

    from lightreasoner_ray.runs.demo import machine_description

    description = machine_description()
    cpu = description.split(", torch ")[0]
    assert cpu and f"torch {torch.__version__}, {torch.get_num_threads()} threads" in description
    info = Path("/proc/cpuinfo")
    if info.is_file() and "model name" in info.read_text():
        assert cpu in info.read_text()


class _Pair:
    expert_path = amateur_path = "pair"
    expert_accuracy = amateur_accuracy = 0.0


def test_report_rows_for_rejection_sft_and_rounds_charge_their_own_sampling(tmp_path):
    from lightreasoner_ray.runs.demo_report import title

    config = demo_config([f"output_dir={tmp_path}", "demo.seeds=[0,1]", "demo.rounds=2"])
    accuracy = {"amateur": 0.2, "expert": 0.6, "lightreasoner-seed0": 0.62, "lightreasoner-seed1": 0.64,
                "lightreasoner_round2-seed0": 0.66, "lightreasoner_round2-seed1": 0.60,
                "rejection_sft-seed0": 0.7, "rejection_sft-seed1": 0.7}
    results = {"models": {tag: {"benchmarks": {"toy": {"accuracy": a}}} for tag, a in accuracy.items()}}

    def run(seed, tuned, sampling, train, **extra):
        return {"seed": seed, "model": "m", "tuned_tokens": tuned, "train_time_s": train, "resumed": False,
                "sampling_time_s": sampling, **extra}

    runs = {
        "lightreasoner": [run(0, 50, 4.0, 10.0, problems=8), run(1, 50, 4.0, 12.0, problems=8)],
        "lightreasoner_round2": [run(0, 40, 6.0, 10.0, problems=8), run(1, 45, 8.0, 10.0, problems=8)],
        "rejection_sft": [run(0, 300, 30.0, 20.0, problems=8, solutions_kept=11),
                          run(1, 300, 30.0, 22.0, problems=8, solutions_kept=11)],
        "sft": [],
    }
    rejection = {"samples_per_problem": 4, "temperature": 0.7, "sampled": 32, "correct": 14, "kept": 11,
                 "problems_with_a_kept_solution": 7}
    report = demo_report(config, _Pair(), results, runs, [{"completion_ids": [1, 2]}] * 8, {"sample": 4.0}, 50,
                         rejection=rejection)
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["amateur", "expert", "lightreasoner", "lightreasoner_round2", "rejection_sft"]
    assert rows["rejection_sft"]["wall_time_s"] == 30.0 + 21.0 and rows["rejection_sft"]["solutions_kept"] == 11
    assert rows["lightreasoner_round2"]["wall_time_s"] == 7.0 + 10.0
    # Each seed's round-2 model samples its own steps: the row shows their mean and keeps each.
    assert rows["lightreasoner_round2"]["tuned_tokens"] == round(42.5) and rows["lightreasoner_round2"]["tuned_tokens_per_seed"] == [40, 45]
    assert rows["lightreasoner"]["solutions_kept"] is None and rows["lightreasoner"]["wall_time_s"] == 4.0 + 11.0
    markdown = demo_markdown(report)
    assert "| expert + SFT (rejection-sampled) | 70.0 ± 0.0 | – | 8 | 11 | 300 | 51 s |" in markdown
    assert f"| {title('lightreasoner_round2')} | 63.0 ± 4.2 |" in markdown
    assert "sampled 4 solutions a problem at temperature 0.7 (32 in all), 14 reached the gold answer, 11 distinct" in markdown
    assert "test accuracy (%)" in markdown and "never used for a choice" in markdown

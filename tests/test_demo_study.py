"""bench/demo_study.py: its hierarchical bootstrap against known answers, and the study end to end on
finished demo directories written here (the real study runs `lightreasoner demo` once per pair)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("demo_study", REPO_ROOT / "bench" / "demo_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_study"] = module
    spec.loader.exec_module(module)
    return module


def _pair(study, seed, correct, problems=None):
    n = len(next(iter(correct.values())))
    return study.PairOutcomes(seed, problems or [f"q{i}" for i in range(n)], {k: np.asarray(v, float) for k, v in correct.items()},
                              {})


def test_identical_variants_differ_by_exactly_zero(study):
    rng = np.random.default_rng(1)
    pairs = []
    for p in range(3):
        expert = rng.integers(0, 2, 50)
        pairs.append(_pair(study, p, {"expert": expert, **{f"lightreasoner-seed{s}": expert for s in (0, 1)}}))
    interval = study.hierarchical_interval(pairs, [0, 1], lambda pair, s: pair.vector("lightreasoner", s)
                                           - pair.vector("expert", s), resamples=300)
    assert interval == {"mean": 0.0, "low": 0.0, "high": 0.0}


def test_a_constant_gain_on_every_problem_is_found_with_a_tight_interval(study):
    """Variant = expert with 10 of 100 wrong answers fixed, the same ones for every seed and pair: the difference
    is exactly +0.10 and no resampling of pairs or seeds can move it; resampling problems spreads it a little."""
    pairs = []
    for p in range(3):
        expert = np.zeros(100)
        expert[:60] = 1
        better = expert.copy()
        better[60:70] = 1
        pairs.append(_pair(study, p, {"expert": expert, **{f"lightreasoner-seed{s}": better for s in (0, 1, 2)}}))
    interval = study.hierarchical_interval(pairs, [0, 1, 2], lambda pair, s: pair.vector("lightreasoner", s)
                                           - pair.vector("expert", s), resamples=1000)
    assert interval["mean"] == pytest.approx(0.10)
    assert 0.03 < interval["low"] < 0.10 < interval["high"] < 0.17


def test_pairs_that_disagree_give_an_interval_spanning_their_spread(study):
    """One pair gains 20 points, two lose 10: the mean is 0 and the interval reaches both (pairs are resampled)."""
    pairs = []
    for p, shift in enumerate((20, -10, -10)):
        expert = np.zeros(100)
        expert[:50] = 1
        variant = np.zeros(100)
        variant[: 50 + shift] = 1
        pairs.append(_pair(study, p, {"expert": expert, "lightreasoner-seed0": variant}))
    interval = study.hierarchical_interval(pairs, [0], lambda pair, s: pair.vector("lightreasoner", s)
                                           - pair.vector("expert", s), resamples=2000)
    assert interval["mean"] == pytest.approx(0.0)
    assert interval["low"] <= -0.09 and interval["high"] >= 0.15


def test_seed_noise_widens_the_interval_over_problem_noise_alone(study):
    rng = np.random.default_rng(5)
    one_seed, noisy_seeds = [], []
    for p in range(3):
        expert = rng.integers(0, 2, 200).astype(float)
        one_seed.append(_pair(study, p, {"expert": expert, **{f"v-seed{s}": expert for s in range(3)}}))
        seeded = {}
        for s, shift in enumerate((0.3, 0.0, -0.3)):  # seeds move accuracy by +-30 points
            flips = rng.random(200) < abs(shift)
            seeded[f"v-seed{s}"] = np.where(flips, 1.0 if shift > 0 else 0.0, expert) if shift else expert
        noisy_seeds.append(_pair(study, p, {"expert": expert, **seeded}))
    def width(pairs):
        i = study.hierarchical_interval(pairs, [0, 1, 2], lambda pair, s: pair.vector("v", s) - pair.vector("expert", s),
                                        resamples=500)
        return i["high"] - i["low"]
    assert width(one_seed) == 0.0 and width(noisy_seeds) > 0.05


def _write_demo(root: Path, pair_seed: int, correct: dict[str, list[int]], slips: dict[str, float]) -> Path:
    from lightreasoner_ray.io.layout import RunLayout

    directory = root / f"pair{pair_seed}"
    layout = RunLayout(str(directory))
    for tag, values in correct.items():
        path = Path(layout.eval_model_layout(tag).predictions("toy"))
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written out of order: the study lines rows up by problem id.
        rows = [{"id": f"t{i}", "correct": bool(v), "output": ""} for i, v in enumerate(values)][::-1]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = {"evaluation": {"models": {tag: {} for tag in correct}},
              "rows": [{"model": name, "hasty_slip_rate": rate} for name, rate in slips.items()],
              "toy_pair": {"fingerprint": f"fp{pair_seed}", "machine": "Test CPU, torch 0, 2 threads"}}
    Path(layout.demo_results["json"]).write_text(json.dumps(report))
    return directory


def test_the_study_reads_finished_demos_and_writes_its_table_json_and_chart(study, tmp_path):
    """Two pairs, two seeds, six problems: every number in the table is checked against a hand count."""
    names = ["lightreasoner", "lightreasoner_round2", "rejection_sft", "sft", "random_steps", "lightreasoner_reverse_kl"]
    runs = []

    def runner(out, pair_seed, seeds, overrides):
        runs.append((pair_seed, list(seeds), list(overrides)))
        expert = [1, 1, 1, 0, 0, 0]
        correct = {"amateur": [1, 0, 0, 0, 0, 0], "expert": expert}
        for name in names:
            for seed in seeds:
                gained = 2 if name == "lightreasoner" else (1 if name != "lightreasoner_round2" else 0)
                correct[f"{name}-seed{seed}"] = [1, 1, 1] + [1 if i < gained else 0 for i in range(3)]
        return _write_demo(out, pair_seed, correct, {"expert": 0.5, "lightreasoner": 0.0})

    result = study.main(["--options", "reverse_kl", "--pairs", "0", "1", "--seeds", "0", "1", "--out", str(tmp_path),
                         "--resamples", "200", "train.lr=1e-3"], runner=runner)
    assert runs == [(0, [0, 1], ["demo.options=[reverse_kl]", "train.lr=1e-3"]),
                    (1, [0, 1], ["demo.options=[reverse_kl]", "train.lr=1e-3"])]
    assert result["accuracy"]["expert"]["mean"] == pytest.approx(0.5)
    assert result["accuracy"]["lightreasoner"]["mean"] == pytest.approx(5 / 6)
    differences = {(d["a"], d["b"]): d for d in result["differences"]}
    assert differences[("lightreasoner", "expert")]["mean"] == pytest.approx(2 / 6)
    assert differences[("lightreasoner", "random_steps")]["per_pair"] == pytest.approx([1 / 6, 1 / 6])
    assert differences[("lightreasoner_round2", "lightreasoner")]["mean"] == pytest.approx(-2 / 6)
    # An option is compared with LightReasoner itself; options not run are not compared.
    assert differences[("lightreasoner_reverse_kl", "lightreasoner")]["mean"] == pytest.approx(-1 / 6)
    assert ("lightreasoner_jsd", "lightreasoner") not in differences
    gain = differences[("lightreasoner", "expert")]
    assert 0 <= gain["low"] <= gain["mean"] <= gain["high"] and gain["distinguishable"] == (gain["low"] > 0)
    markdown = (tmp_path / "study.md").read_text()
    assert "| expert + LightReasoner | 83.3 [" in markdown
    assert "| expert + LightReasoner − expert | +33.3 [" in markdown and "| +33.3, +33.3 | " in markdown
    assert "| expert + LightReasoner, reverse KL − LightReasoner | -16.7 [" in markdown
    assert "pair seed 0: fp0; pair seed 1: fp1" in markdown and "Test CPU" in markdown
    assert json.loads((tmp_path / "study.json").read_text())["seeds"] == [0, 1]
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"

    again = study.main(["--pairs", "0", "1", "--seeds", "0", "1", "--out", str(tmp_path), "--resamples", "200",
                        "--analyse-only"], runner=lambda *a: pytest.fail("--analyse-only runs nothing"))
    assert again["differences"] == result["differences"]  # the same seeded bootstrap


def test_a_model_graded_on_other_problems_is_refused(study, tmp_path):
    directory = _write_demo(tmp_path, 0, {"expert": [1, 0], "lightreasoner-seed0": [1, 0, 1]}, {})
    with pytest.raises(ValueError, match="other problems"):
        study.read_pair(directory, 0)


def test_problems_shared_by_every_pair_are_drawn_once_per_resample(study):
    """The same few problems carry the gain in every pair. Crossed (the demo: every pair on the same problems),
    one draw of problems moves all pairs together, so the interval is wider than if each pair had problems of
    its own (the same vectors under distinct ids)."""
    def pairs(crossed):
        out = []
        for p in range(3):
            expert = np.zeros(60)
            variant = expert.copy()
            variant[:6] = 1  # problems 0-5 fixed in every pair
            ids = [f"q{i}" if crossed else f"p{p}q{i}" for i in range(60)]
            out.append(_pair(study, p, {"expert": expert, "lightreasoner-seed0": variant}, problems=ids))
        return out

    def width(group):
        i = study.hierarchical_interval(group, [0], lambda pair, s: pair.vector("lightreasoner", s)
                                        - pair.vector("expert", s), resamples=1500)
        return i["high"] - i["low"]

    assert width(pairs(crossed=True)) > 1.4 * width(pairs(crossed=False))

"""`run` refuses, before sampling, what its evaluation stage could not do."""

import pytest

from lightreasoner_ray.config import load_config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.runs.pipeline import check_before_start
from lightreasoner_ray.runs.round import pipeline_eval_models

from conftest import DATA_DIR, REPO_ROOT


def config(*overrides):
    return load_config(REPO_ROOT / "configs" / "tiny.yaml", [f"eval.data_dir={DATA_DIR}", *overrides])


def test_uri_output_dir_is_refused_for_run():
    with pytest.raises(LightReasonerError, match="use a shared filesystem path"):
        check_before_start(config("output_dir=s3://bucket/run"))


def test_missing_benchmark_file_is_found_before_sampling(tmp_path):
    with pytest.raises(LightReasonerError, match="svamp/test.jsonl"):
        check_before_start(config(f"eval.data_dir={tmp_path}", "eval.benchmarks=[svamp]"))


def test_run_evaluates_the_baseline_and_the_trained_model():
    models = pipeline_eval_models(config("expert.path=/m/expert", "output_dir=/o", "eval.model=/ignored"))
    assert models == ["baseline=/m/expert", "lightreasoner=/o/model"]
    check_before_start(config())  # the tiny config's benchmarks are all there

"""Bad input never reaches a model or a Ray worker: one line naming what is wrong.

A tokenizer with ids past the model's embedding rows and a model directory without weights are
refused on the driver by `sample`, `rejection_sample` and `evaluate` (Ray is never started here:
``init_ray`` is replaced by a tripwire); an error raised inside a Ray worker comes back as one
line (the unwrapping is checked on Ray's own exception objects, without starting Ray); an actor
no node can host fails after the stated wait, naming both sides; vLLM's CPU defaults.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import DATA_DIR, REPO_ROOT, requires_extra
from lightreasoner_ray.config import VLLMConfig, load_config
from lightreasoner_ray.errors import LightReasonerError


def no_ray(monkeypatch, *modules):
    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was started: the input should have been refused first")

    for module in modules:
        monkeypatch.setattr(module, "init_ray", tripwire)


@pytest.fixture(scope="module")
def wide_tokenizer_expert(tiny_pair, tmp_path_factory) -> Path:
    """The tiny expert with 8 tokens added to its tokenizer: ids past its embedding rows."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("wide") / "expert"
    shutil.copytree(tiny_pair["expert"], directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(8)])
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def weightless_expert(tiny_pair, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("weightless") / "expert"
    shutil.copytree(tiny_pair["expert"], directory)
    removed = [path for path in directory.iterdir() if path.suffix in (".safetensors", ".bin")]
    assert removed
    for path in removed:
        path.unlink()
    return directory


def sampling_config(tiny_pair, problems_file, output_dir, expert, *extra):
    return load_config(REPO_ROOT / "configs" / "tiny.yaml", [
        f"expert.path={expert}", f"amateur.path={tiny_pair['amateur']}", f"data.problems={problems_file}",
        f"output_dir={output_dir}", "data.limit=2", *extra,
    ])


def eval_config(output_dir, model):
    return load_config(None, [f"output_dir={output_dir}", f"eval.data_dir={DATA_DIR}", "eval.benchmarks=[gsm8k]",
                              "eval.limit=1", f"eval.model={model}"])


# ---- tokenizer ids past the embedding ----------------------------------------------------


def test_tokenizer_wider_than_the_embedding_is_refused_by_sample(tiny_pair, problems_file, wide_tokenizer_expert,
                                                                  tmp_path, monkeypatch):
    import lightreasoner_ray.stages.sampling.stage as stage
    from transformers import AutoConfig, AutoTokenizer

    rows = AutoConfig.from_pretrained(wide_tokenizer_expert).vocab_size
    largest = len(AutoTokenizer.from_pretrained(wide_tokenizer_expert)) - 1
    assert largest >= rows  # the oracle: the fixture really has ids past the embedding
    no_ray(monkeypatch, stage)
    with pytest.raises(LightReasonerError) as error:
        stage.run_sampling(sampling_config(tiny_pair, problems_file, tmp_path / "out", wide_tokenizer_expert))
    message = str(error.value)
    assert f"token ids up to {largest}" in message and f"{rows} embedding rows" in message
    assert str(wide_tokenizer_expert) in message and "\n" not in message


def test_tokenizer_wider_than_the_embedding_is_refused_by_evaluate(wide_tokenizer_expert, tmp_path, monkeypatch):
    import lightreasoner_ray.stages.evaluation.stage as stage

    no_ray(monkeypatch, stage)
    with pytest.raises(LightReasonerError, match=r"tokenizer .* has token ids up to \d+ but the model .* embedding rows"):
        stage.run_evaluation(eval_config(tmp_path / "out", wide_tokenizer_expert))


def test_tokenizer_wider_than_the_embedding_is_refused_by_rejection_sampling(tiny_pair, problems_file,
                                                                             wide_tokenizer_expert, tmp_path,
                                                                             monkeypatch):
    import lightreasoner_ray.stages.rejection_sampling as stage

    no_ray(monkeypatch, stage)
    config = sampling_config(tiny_pair, problems_file, tmp_path / "out", wide_tokenizer_expert)
    with pytest.raises(LightReasonerError, match=r"embedding rows"):
        stage.run_rejection_sampling(config)


def test_the_fixture_pair_itself_passes_the_check(tiny_pair):
    """Padded heads (more rows than tokens, as real checkpoints have) are fine."""
    from lightreasoner_ray.config import ModelConfig
    from lightreasoner_ray.engines.models import check_local_model, load_tokenizer

    expert = ModelConfig(path=str(tiny_pair["expert"]))
    check_local_model(expert, "expert")
    check_local_model(ModelConfig(path=str(tiny_pair["amateur"])), "amateur", load_tokenizer(expert))


# ---- missing weights ------------------------------------------------------------------------


def test_missing_weights_are_refused_by_sample_before_ray(tiny_pair, problems_file, weightless_expert, tmp_path,
                                                          monkeypatch):
    import lightreasoner_ray.stages.sampling.stage as stage

    no_ray(monkeypatch, stage)
    with pytest.raises(LightReasonerError, match=rf"expert model directory {weightless_expert} holds no weights"):
        stage.run_sampling(sampling_config(tiny_pair, problems_file, tmp_path / "out", weightless_expert))


def test_missing_weights_are_refused_by_evaluate_before_ray(weightless_expert, tmp_path, monkeypatch):
    import lightreasoner_ray.stages.evaluation.stage as stage

    no_ray(monkeypatch, stage)
    with pytest.raises(LightReasonerError, match=r"eval model 'expert' model directory .* holds no weights"):
        stage.run_evaluation(eval_config(tmp_path / "out", weightless_expert))


# ---- errors from inside Ray workers -----------------------------------------------------------


def test_a_lightreasoner_error_in_a_worker_comes_back_as_its_own_line():
    from ray.exceptions import RayTaskError, UserCodeException

    from lightreasoner_ray.stages.ray_helpers import worker_error

    cause = LightReasonerError("cannot load the expert model from /m: no file named model.safetensors")
    wrapped = RayTaskError("ContrastiveSampler.__init__", "Traceback (most recent call last):\n  ...\n", cause)
    as_cause = wrapped.as_instanceof_cause()
    assert isinstance(as_cause, LightReasonerError)  # Ray's dual class: str() is the whole traceback
    assert "\n" in str(as_cause) and str(as_cause) != str(cause)
    for raised in (wrapped, as_cause):
        outer = UserCodeException("UDF failed")
        outer.__cause__ = raised
        error = worker_error(outer, "sampling problems")
        assert str(error) == str(cause)


def test_another_error_in_a_worker_is_its_type_and_first_line():
    from ray.exceptions import RayTaskError

    from lightreasoner_ray.stages.ray_helpers import worker_error

    cause = IndexError("index out of range in self\nmore detail")
    error = worker_error(RayTaskError("f", "Traceback ...\n", cause).as_instanceof_cause(), "evaluation")
    assert str(error) == "evaluation failed in a Ray worker: IndexError: index out of range in self"


def test_a_dead_actor_is_one_line_and_a_local_error_is_left_alone():
    from ray.exceptions import ActorDiedError

    from lightreasoner_ray.stages.ray_helpers import worker_error

    from ray.data.exceptions import SystemException

    died = ActorDiedError()
    died.__cause__ = SystemException()  # as Ray Data raises a dead actor
    for raised in (ActorDiedError(), died):
        error = worker_error(raised, "sampling problems")
        assert str(error).startswith("sampling problems: a Ray worker died: ") and "\n" not in str(error)
        assert "re-run to resume" in str(error)
    assert worker_error(ValueError("a local bug"), "sampling problems") is None


# ---- placement ----------------------------------------------------------------------------------


def test_placement_needs_one_node_with_both_resources():
    from lightreasoner_ray.stages.ray_helpers import describe_cluster, placeable

    nodes = [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 4.0}]
    assert placeable(nodes, 2, 4) and placeable(nodes, 8, 1)
    assert not placeable(nodes, 8, 4)  # 10 CPUs and 5 GPUs in all, but on no single node
    assert not placeable([], 1, 0)
    assert describe_cluster(nodes) == "2 node(s), 10 CPUs and 5 GPUs in all, the largest 2 CPUs and 4 GPUs"


def test_an_actor_no_node_can_host_fails_after_the_stated_wait(monkeypatch):
    import time

    import lightreasoner_ray.stages.ray_helpers as helpers

    monkeypatch.setattr(helpers, "node_resources", lambda: [{"CPU": 2.0}])
    monkeypatch.setattr(helpers, "_request_resources", lambda bundles: False)
    monkeypatch.setenv(helpers.PLACEMENT_TIMEOUT_ENV, "0.5")
    started = time.monotonic()
    with pytest.raises(LightReasonerError) as error:
        helpers.wait_for_placement("evaluator", 1, 1)
    assert 0.5 <= time.monotonic() - started < 10
    message = str(error.value)
    assert "after 0.5s" in message and "asks for 1 CPUs and 1 GPUs" in message and "1 node(s), 2 CPUs and 0 GPUs" in message


def test_a_node_that_joins_while_waiting_is_used(monkeypatch):
    import lightreasoner_ray.stages.ray_helpers as helpers

    answers = iter([[{"CPU": 2.0}], [{"CPU": 2.0}], [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}]])
    requests = []
    monkeypatch.setattr(helpers, "node_resources", lambda: next(answers))
    monkeypatch.setattr(helpers, "_request_resources", lambda bundles: requests.append(bundles) or True)
    monkeypatch.setattr(helpers.time, "sleep", lambda seconds: None)
    helpers.wait_for_placement("sampler", 1, 1, timeout_s=60)
    assert requests == [[{"CPU": 1.0, "GPU": 1.0}], []]  # the autoscaler was asked, then the ask withdrawn


# ---- vLLM on a CPU --------------------------------------------------------------------------------


def test_vllm_cpu_kv_cache_default_is_small_and_explicit_settings_win():
    from lightreasoner_ray.engines.vllm import CPU_KV_CACHE_MAX_BYTES, cpu_kv_cache_bytes

    gib = 1 << 30
    assert cpu_kv_cache_bytes(VLLMConfig(), 24 * gib, {}) == CPU_KV_CACHE_MAX_BYTES
    assert cpu_kv_cache_bytes(VLLMConfig(), 4 * gib, {}) == int(0.4 * gib)
    assert cpu_kv_cache_bytes(VLLMConfig(kv_cache_memory_bytes=3 * gib), 24 * gib, {}) is None
    # A GPU share would reserve that share of the whole machine: not used on a CPU.
    assert cpu_kv_cache_bytes(VLLMConfig(gpu_memory_utilization=0.5), 24 * gib, {}) == CPU_KV_CACHE_MAX_BYTES
    assert cpu_kv_cache_bytes(VLLMConfig(), 24 * gib, {"VLLM_CPU_KVCACHE_SPACE": "2"}) is None
    with pytest.raises(LightReasonerError, match=r"kv_cache_memory_bytes"):
        cpu_kv_cache_bytes(VLLMConfig(), 100 << 20, {})


@pytest.mark.slow  # imports vLLM (seconds), starts nothing
@requires_extra("vllm")
def test_vllm_cpu_refuses_a_head_size_it_has_no_kernel_for(tmp_path):
    import json

    from lightreasoner_ray.engines.vllm import check_cpu_head_size

    for hidden, heads, refused in ((48, 2, True), (64, 2, False)):
        directory = tmp_path / f"h{hidden}"
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({
            "model_type": "qwen2", "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": 1,
            "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 100,
        }))
        if refused:
            with pytest.raises(LightReasonerError, match=r"head size is 24, and the backend supports 32, "):
                check_cpu_head_size(str(directory), False)
        else:
            check_cpu_head_size(str(directory), False)


def test_an_actor_whose_constructor_raised_is_that_errors_line():
    """Ray keeps only the text of a failed creation task: its last line is the error."""
    from ray.exceptions import ActorDiedError, RayTaskError

    from lightreasoner_ray.stages.ray_helpers import worker_error

    traceback = ("Traceback (most recent call last):\n  File \"sampler.py\", line 9, in __init__\n"
                 "lightreasoner_ray.errors.LightReasonerError: expert model directory /m holds no weights\n")
    died = ActorDiedError(RayTaskError("__init__", traceback, LightReasonerError("expert model directory /m holds no weights")))
    assert str(worker_error(died, "sampling problems")) == "expert model directory /m holds no weights"
    other = ActorDiedError(RayTaskError("__init__", "Traceback (most recent call last):\nIndexError: bad id\n", IndexError("bad id")))
    assert str(worker_error(other, "sampling problems")) == (
        "sampling problems: an actor failed while loading its model: IndexError: bad id")

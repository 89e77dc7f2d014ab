import pytest

from lightreasoner_ray.config import load_config
from lightreasoner_ray.errors import LightReasonerError

from conftest import REPO_ROOT


def test_defaults_follow_the_paper():
    config = load_config(None, [])
    assert (config.sampling.alpha, config.sampling.beta, config.sampling.max_new_tokens) == (0.2, 0.4, 128)
    assert (config.train.lr, config.train.micro_batch_steps, config.train.grad_accum, config.train.max_steps) == (5e-5, 8, 2, 1000)
    assert (config.train.lora.r, config.train.lora.alpha, config.train.lora.dropout) == (8, 16, 0.05)
    assert config.train.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.limit == 1000


def test_yaml_and_dotted_overrides():
    config = load_config(REPO_ROOT / "configs" / "tiny.yaml",
                         ["sampling.beta=0.7", "eval.benchmarks=[gsm8k,math500]", "train.lora.enabled=false",
                          "data.limit=null", "train.deepspeed.stage=3", "output_dir=/tmp/x"])
    assert config.sampling.beta == 0.7
    assert config.eval.benchmarks == ["gsm8k", "math500"]
    assert config.train.lora.enabled is False
    assert config.data.limit is None
    assert config.train.deepspeed.stage == 3
    assert config.output_dir == "/tmp/x"
    assert config.sampling.num_actors == 2  # from the YAML
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001  # YAML 1.1 reads 1e-3 as a string


@pytest.mark.parametrize(
    "override, message",
    [
        ("sampling.bta=0.5", "Did you mean sampling.beta"),
        ("samplng.beta=0.5", "Valid keys here"),
        ("sampling.alpha=0", "sampling.alpha must be in (0, 1]"),
        ("sampling.alpha=1.5", "sampling.alpha must be in (0, 1]"),
        ("sampling.beta=-0.1", "sampling.beta must be >= 0"),
        ("sampling.max_new_tokens=0", "sampling.max_new_tokens must be > 0"),
        ("sampling.beta=abc", "sampling.beta must be a number"),
        ("train.deepspeed.stage=4", "train.deepspeed.stage must be one of 0, 1, 2, 3"),
        ("train.lora.enabled=maybe", "train.lora.enabled must be true or false"),
        ("expert=3", "expert must be a mapping"),
        ("novalue", "key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(LightReasonerError, match=None) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_missing_config_file():
    with pytest.raises(LightReasonerError, match="does-not-exist.yaml does not exist"):
        load_config("does-not-exist.yaml")


def test_every_shipped_config_loads():
    for path in sorted((REPO_ROOT / "configs").glob("*.yaml")):
        load_config(path)


def test_unknown_benchmark_and_bad_lora_alpha_are_config_errors():
    with pytest.raises(LightReasonerError, match="unknown benchmark 'nope'; known benchmarks: gsm8k"):
        load_config(None, ["eval.benchmarks=[gsm8k,nope]"])
    with pytest.raises(LightReasonerError, match="train.lora.r and train.lora.alpha must be > 0"):
        load_config(None, ["train.lora.alpha=-3"])

import pytest

from lightreasoner_ray.config import load_config
from lightreasoner_ray.errors import LightReasonerError

from conftest import REPO_ROOT


def test_defaults_follow_the_paper():
    config = load_config(None, [])
    assert (config.sampling.alpha, config.sampling.beta, config.sampling.max_new_tokens) == (0.2, 0.4, 128)
    assert (config.train.lr, config.train.steps_per_update, config.train.micro_batch_steps, config.train.max_steps) == (5e-5, 16, 8, 1000)
    assert (config.train.lora.r, config.train.lora.alpha, config.train.lora.dropout) == (8, 16, 0.05)
    assert config.train.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.limit == 1000


def test_grad_accum_is_refused_with_what_to_set_instead():
    with pytest.raises(LightReasonerError) as error:
        load_config(None, ["train.grad_accum=2"])
    assert "train.grad_accum is no longer a setting" in str(error.value)
    assert "train.steps_per_update=16" in str(error.value)
    with pytest.raises(LightReasonerError, match="train.steps_per_update=4 is smaller than train.num_workers=8"):
        load_config(None, ["train.steps_per_update=4", "train.num_workers=8"])
    with pytest.raises(LightReasonerError, match="train.steps_per_update must be > 0"):
        load_config(None, ["train.steps_per_update=0"])


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
    paths = sorted((REPO_ROOT / "configs").rglob("*.yaml"))
    assert {path.parent.name for path in paths} == {"configs", "reference"}
    for path in paths:
        load_config(path)


@pytest.mark.parametrize("name", ["qwen2.5-math-1.5b", "qwen2.5-math-7b", "deepseek-r1-distill-qwen-1.5b"])
def test_reference_presets_are_the_reference_run(name):
    """HKUDS/LightReasoner's settings (LightR_sampling.py, LightR_finetuning.py, HF Trainer defaults) and
    the Qwen2.5-Math toolkit's evaluation (math_eval.py --prompt_type qwen25-math-cot), written out here."""
    config = load_config(REPO_ROOT / "configs" / "reference" / f"{name}.yaml")
    assert (config.data.limit, config.data.shuffle, config.data.offset) == (1000, False, 0)
    assert config.amateur.path == "Qwen/Qwen2.5-0.5B"
    sampling = config.sampling
    assert (sampling.alpha, sampling.beta, sampling.max_new_tokens, sampling.selection) == (0.2, 0.4, 128, "reference")
    assert sampling.system_prompt == "Please reason step by step."
    train = config.train
    assert (train.max_steps, train.lr, train.steps_per_update, train.micro_batch_steps) == (1000, 5e-5, 16, 8)
    assert (train.lr_schedule, train.warmup_steps, train.max_grad_norm, train.weight_decay) == ("linear", 0, 1.0, 0.0)
    lora = train.lora
    assert (lora.enabled, lora.r, lora.alpha, lora.dropout, lora.target_modules) == (True, 8, 16, 0.05, ["q_proj", "v_proj"])
    evaluation = config.eval
    assert (evaluation.prompt, evaluation.max_new_tokens, evaluation.limit) == ("qwen25-math-cot", 2048, None)
    assert evaluation.benchmarks == ["gsm8k", "math", "svamp", "asdiv", "minerva_math", "olympiadbench", "mmlu_stem"]
    header = (REPO_ROOT / "configs" / "reference" / f"{name}.yaml").read_text().split("\nexpert:")[0]
    assert "Remaining differences" in header


def test_unknown_benchmark_and_bad_lora_alpha_are_config_errors():
    with pytest.raises(LightReasonerError, match="unknown benchmark 'nope'; known benchmarks: gsm8k"):
        load_config(None, ["eval.benchmarks=[gsm8k,nope]"])
    with pytest.raises(LightReasonerError, match="train.lora.r and train.lora.alpha must be > 0"):
        load_config(None, ["train.lora.alpha=-3"])


@pytest.mark.parametrize("override", ["train.lr=nan", "train.max_grad_norm=nan", "sampling.beta=nan",
                                      "eval.temperature=inf", "sampling.alpha=.nan", "train.weight_decay=-.inf",
                                      "eval.top_p=NaN"])
def test_every_number_must_be_finite(override):
    """NaN passes every range check (its comparisons are all false); inf overflows later."""
    key = override.split("=", 1)[0]
    with pytest.raises(LightReasonerError, match=rf"^{key} must be a finite number, got ") as caught:
        load_config(None, [override])
    assert "\n" not in str(caught.value)


def test_a_nan_in_a_yaml_file_is_refused_naming_the_key_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: .nan\n")
    with pytest.raises(LightReasonerError, match=r"train.lr must be a finite number.*\(in .*c.yaml\)"):
        load_config(path)


def test_a_config_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("sampling:\n  system_prompt: \"R\xe9fl\xe9chis\"\n".encode("latin-1"))
    with pytest.raises(LightReasonerError, match=rf"config file {path} is not UTF-8 text \(byte \d+") as caught:
        load_config(path)
    assert "\n" not in str(caught.value)

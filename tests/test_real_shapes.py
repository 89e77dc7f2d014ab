"""Random-weight models at the published shapes (lightreasoner_ray.toy.real_shapes), at tiny widths.

The real vocabulary (151,936 rows, 151,665 tokens) is kept; bodies are shrunk so a test
writes a model in about a second.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.toy import real_shapes

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
GSM8K = ROOT.parent / "shared" / "data" / "benchmarks" / "gsm8k" / "test.jsonl"


def _memory_model():
    spec = importlib.util.spec_from_file_location("memory_model", ROOT / "bench" / "memory_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("memory_model", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_math(tmp_path_factory):
    return real_shapes.write_model("qwen2.5-math-1.5b", tmp_path_factory.mktemp("math") / "m", num_layers=1,
                                   dtype="float32", overrides=TINY)


@pytest.fixture(scope="module")
def tiny_amateur(tmp_path_factory):
    return real_shapes.write_model("qwen2.5-0.5b", tmp_path_factory.mktemp("amateur") / "m", num_layers=1,
                                   dtype="float32", overrides=dict(TINY, hidden_size=32, num_attention_heads=2,
                                                                   num_key_value_heads=1))


def test_special_tokens_sit_at_the_real_ids(tiny_math):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_math)
    assert len(tokenizer) == 151_665
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                           "<tool_call>", "<|file_sep|>"])
    assert ids == [151_643, 151_644, 151_645, 151_646, 151_657, 151_664]
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 151_643
    # Special tokens are atomic in text, as in the real tokenizer.
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False)[0] == 151_644


def test_embedding_rows_and_config_equal_the_published_json(tiny_math):
    from transformers import AutoModelForCausalLM

    published = json.loads((ROOT / "lightreasoner_ray" / "toy" / "shapes" / "qwen2.5-math-1.5b.json").read_text())["config"]
    written = json.loads((tiny_math / "config.json").read_text())
    for key, value in published.items():
        if key in TINY or key in ("num_hidden_layers", "max_window_layers", "torch_dtype"):
            continue
        assert written[key] == value, key
    assert written["num_hidden_layers"] == 1
    model = AutoModelForCausalLM.from_pretrained(tiny_math)
    assert model.get_input_embeddings().weight.shape == (151_936, 64)
    assert model.config.tie_word_embeddings and model.get_output_embeddings().weight.data_ptr() == \
        model.get_input_embeddings().weight.data_ptr()
    generation = json.loads((tiny_math / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 151_643


def test_chat_template_is_the_qwen_format(tiny_math):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_math)
    messages = [{"role": "system", "content": "Please reason step by step."}, {"role": "user", "content": "1+1?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nPlease reason step by step.<|im_end|>\n"
                    "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n")
    default = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert default == ("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                       "\\boxed{}.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n")


def test_gsm8k_text_round_trips():
    tokenizer = real_shapes.build_tokenizer("qwen2.5-math-1.5b")
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:50]]
    for row in rows:
        for text in (row["question"], row["answer"]):
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert max(ids) < 151_643  # ordinary text never lands on a filler or special id... nor past the BPE
            assert tokenizer.decode(ids) == text


def test_deepseek_r1_distill_special_tokens_and_template():
    tokenizer = real_shapes.build_tokenizer("deepseek-r1-distill-qwen-1.5b")
    assert len(tokenizer) == 151_665
    assert tokenizer.eos_token_id == 151_643 and tokenizer.bos_token_id == 151_646
    assert tokenizer.convert_tokens_to_ids(["<｜User｜>", "<｜Assistant｜>", "<think>"]) == [151_644, 151_645, 151_648]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<｜begin▁of▁sentence｜><｜User｜>2+2?<｜Assistant｜><think>\n"


def test_the_model_loads_with_our_engines_and_the_vocabulary_is_cut(tiny_math, tiny_amateur):
    from lightreasoner_ray.config import ModelConfig
    from lightreasoner_ray.core.lm_head import LMHead
    from lightreasoner_ray.engines.generation import completion_logits, greedy_generate
    from lightreasoner_ray.engines.models import (
        load_model,
        load_tokenizer,
        pair_vocab_size,
        shared_vocab_size,
    )

    expert_config, amateur_config = ModelConfig(path=str(tiny_math)), ModelConfig(path=str(tiny_amateur))
    tokenizer = load_tokenizer(expert_config, "expert")
    expert = load_model(expert_config, "expert", torch.device("cpu"))
    amateur = load_model(amateur_config, "amateur", torch.device("cpu"))
    assert shared_vocab_size(tokenizer, expert, amateur) == 151_665
    assert pair_vocab_size(expert_config, amateur_config) == 151_665
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], add_generation_prompt=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    completion = greedy_generate(expert, tokenizer, [prompt], max_new_tokens=4)[0]
    assert 1 <= len(completion) <= 4
    rows = completion_logits(expert, [prompt + completion], [len(prompt)], tokenizer.pad_token_id, 151_665)[0]
    logits = rows[0 : len(completion)]
    assert logits.shape == (len(completion), 151_665) and logits.dtype == torch.float32
    # The cut drops exactly the padded head rows: the same as the full head's first 151,665 columns.
    full = LMHead(expert, 151_936)
    assert torch.allclose(ProjectedRowsFull(rows, full)[:, :151_665], logits, atol=1e-5)


def ProjectedRowsFull(rows, head):
    from lightreasoner_ray.core.lm_head import ProjectedRows

    return ProjectedRows(rows.hidden, head)[0 : rows.hidden.shape[0]]


def test_sharded_writing_keeps_one_shard_in_memory_and_loads_the_same(tmp_path):
    from transformers import AutoModelForCausalLM

    single = real_shapes.write_model("qwen2.5-math-7b", tmp_path / "one", num_layers=1, dtype="bfloat16",
                                     overrides=TINY)
    sharded = real_shapes.write_model("qwen2.5-math-7b", tmp_path / "many", num_layers=1, dtype="bfloat16",
                                      overrides=TINY, shard_bytes=8 << 20)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3 and "lm_head.weight" in index["weight_map"]  # untied
    a = AutoModelForCausalLM.from_pretrained(single, dtype=torch.bfloat16).state_dict()
    b = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.bfloat16).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["lm_head.weight"].shape == (152_064, 64) and a["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("shape, published", [
    ("qwen2.5-math-1.5b", 1_543_714_304), ("qwen2.5-0.5b", 494_032_768), ("qwen2.5-math-7b", 7_615_616_512),
])
def test_full_shapes_have_the_published_parameter_counts(shape, published):
    # Built on the meta device: no memory. The model cards state 1.54B, 0.49B and 7.61B.
    assert real_shapes.parameter_count(shape) == published
    assert _memory_model().shape_of(shape).parameters == published


def test_bad_shape_and_depth_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(LightReasonerError, match="unknown shape 'qwen9'"):
        real_shapes.load_shape("qwen9")
    with pytest.raises(LightReasonerError, match="num_layers must be > 0"):
        real_shapes.model_config_dict("qwen2.5-0.5b", num_layers=0)
    assert real_shapes.main(["--shape", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown shape" in capsys.readouterr().err


PRESET_FILES = {
    "qwen2.5-math-1.5b": ["configs/qwen2.5-math-1.5b.yaml", "configs/reference/qwen2.5-math-1.5b.yaml"],
    "deepseek-r1-distill-qwen-1.5b": ["configs/deepseek-r1-distill-qwen-1.5b.yaml",
                                      "configs/reference/deepseek-r1-distill-qwen-1.5b.yaml"],
    "qwen2.5-math-7b": ["configs/qwen2.5-math-7b.yaml", "configs/reference/qwen2.5-math-7b.yaml"],
}


@pytest.mark.parametrize("preset", sorted(PRESET_FILES))
def test_presets_resources_equal_the_memory_models_recommendation(preset):
    recommended = _memory_model().recommend(preset)
    for path in PRESET_FILES[preset]:
        config = yaml.safe_load((ROOT / path).read_text())
        assert config["sampling"]["gpus_per_actor"] == recommended["sampling.gpus_per_actor"], path
        assert config["train"]["num_workers"] == recommended["train.num_workers"], path
        assert config["train"]["deepspeed"]["stage"] == recommended["train.deepspeed.stage"], path
        eval_vllm = config["eval"].get("vllm", {}).get("gpu_memory_utilization", 0.9)
        assert eval_vllm == recommended["eval.vllm.gpu_memory_utilization"], path
        sampling_vllm = config["sampling"].get("vllm", {}).get("gpu_memory_utilization")
        assert sampling_vllm == recommended["sampling.vllm.gpu_memory_utilization"], path
        assert "docs/scale.md" in (ROOT / path).read_text(), path


MEASURE_TEACHER_FORCED = """
import json, re, sys
from pathlib import Path
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from lightreasoner_ray.engines.generation import completion_hidden_states

torch.manual_seed(0)
config = Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=8192, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)
model = Qwen2ForCausalLM(config).eval()
batch, prompt, completion = int(sys.argv[1]), 64, 1024
sequences = [torch.randint(0, 256, (prompt + completion,)).tolist() for _ in range(batch)]
def rss(field):
    return int(re.search(field + r":\\s+(\\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
Path("/proc/self/clear_refs").write_text("5")
before = rss("VmRSS")
hidden = completion_hidden_states(model, sequences, [prompt] * batch, 0)
print(json.dumps({"transient": rss("VmHWM") - before, "kept": sum(h.numel() * 4 for h in hidden)}))
"""


@pytest.mark.slow  # ~12 s and up to ~2 GB if the pass were not bounded
def test_the_teacher_forced_pass_is_bounded_whatever_the_batch():
    """Sampling at 1,024 completion tokens: the contrast's memory must not grow with the batch.

    At the smallest shape that shows it (one layer, MLP 8,192 wide), one pass over a batch of
    16 completions of 1,024 tokens puts 16 x 1,088 x 8,192 x 4 B = 570 MB in each MLP
    intermediate (measured: 1.74 GB transient against 0.12 GB for a batch of one). The pass
    goes through at most TEACHER_FORCED_TOKENS padded tokens at a time, so a batch of 16 must
    peak where a batch that fills one such sub-batch does.
    """
    import subprocess

    from lightreasoner_ray.engines.generation import TEACHER_FORCED_TOKENS

    def transient(batch: int) -> int:
        done = subprocess.run([sys.executable, "-c", MEASURE_TEACHER_FORCED, str(batch)], capture_output=True,
                              text=True, cwd=ROOT, timeout=300, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])["transient"]

    rows_per_pass = max(1, TEACHER_FORCED_TOKENS // (64 + 1024))
    assert rows_per_pass < 16
    full_pass, sixteen = transient(rows_per_pass), transient(16)
    # Kept hidden states grow with the batch (16 x 1,024 x 32 x 4 B = 2 MB); the rest must not
    # (one unbounded pass would add (16 - rows_per_pass) x ~110 MB).
    assert sixteen - full_pass < 64 * 2**20, (full_pass, sixteen)

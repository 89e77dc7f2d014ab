"""eval.prompt=qwen25-math-cot: the Qwen2.5-Math toolkit's prompt text, on real benchmark rows.

The expected strings are written out by hand from the toolkit's rules (QwenLM/Qwen2.5-Math,
evaluation/utils.py PROMPT_TEMPLATES["qwen25-math-cot"], evaluation/parser.py
parse_question), not computed by the code under test.
"""

from __future__ import annotations

import pytest

from lightreasoner_ray.data.benchmarks import load_benchmark
from lightreasoner_ray.config import load_config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.data.prompts import encode_prompt, eval_prompt

from conftest import DATA_DIR

HEAD = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>user\n"
)
TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def row_with_id(benchmark: str, row_id: str) -> dict:
    (row,) = [row for row in load_benchmark(benchmark, DATA_DIR) if row["id"] == row_id]
    return row


# (benchmark, row id, the user turn the toolkit builds for that row)
EXPECTED_QUESTIONS = [
    (  # the question as is
        "gsm8k", "0",
        "Janet\u2019s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
        "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh "
        "duck egg. How much in dollars does she make every day at the farmers' market?",
    ),
    (  # `problem` as is
        "math500", "161", "Evaluate $\\log_264$.",
    ),
    (  # a body without a final "." gets one before the question
        "svamp", "chal-777",
        "There are 87 oranges and 290 bananas in Philip's collection. If the bananas are organized into 2 groups "
        "and oranges are organized into 93 groups. How big is each group of bananas?",
    ),
    (  # a body that ends with "." is left alone
        "svamp", "chal-508",
        "Marco and his dad went strawberry picking. Marco's dad's strawberries weighed 11 pounds. If together "
        "their strawberries weighed 30 pounds. How much did Marco's strawberries weigh?",
    ),
    (  # body + " " + question, the question's trailing space stripped
        "asdiv", "2",
        "Janet has nine oranges and Sharon has seven oranges. How many oranges do Janet and Sharon have together?",
    ),
    (  # a yes/no reference answer adds " (Yes or No)"
        "asdiv", "75",
        "Tessa has 4 apples. Anita gave her 5 more. She needs 10 apples to make a pie. Does she have enough to "
        "make a pie? (Yes or No)",
    ),
    (
        "minerva_math", "142", "How many up quarks does a tritium ($H^3$) nucleus contain?",
    ),
    (  # `question` only
        "olympiadbench", "3091", "Let $T=2$. Compute the product of $-T-i$ and $i-T$, where $i=\\sqrt{-1}$.",
    ),
    (  # choices on the next line, "(A) x (B) y ...", each choice stripped
        "mmlu_stem", "2516",
        "Cat food costs $.47/lb. How much does a 6-lb bag cost?\n"
        "Answer Choices: (A) $2.82 (B) $2.97 (C) $6.47 (D) $12.77",
    ),
    (
        "mmlu_stem", "0",
        "Based on the characteristic population curves that result from plotting population growth of a species, "
        "the most effective means of controlling the mosquito population is to\n"
        "Answer Choices: (A) maintain the population at a point corresponding to the midpoint of its logistic "
        "curve (B) opt for zero population control once the K value of the curve has been reached (C) reduce the "
        "carrying capacity cif the environment to lower the K value (D) increase the mortality rate",
    ),
]


@pytest.mark.parametrize("benchmark, row_id, question", EXPECTED_QUESTIONS,
                         ids=[f"{b}-{i}" for b, i, _ in EXPECTED_QUESTIONS])
def test_qwen25_math_cot_prompt_is_the_toolkits_text(benchmark, row_id, question):
    row = row_with_id(benchmark, row_id)
    # The fixed text needs no tokenizer: it is the same for every model.
    assert eval_prompt(None, row, benchmark, "qwen25-math-cot", "ignored") == HEAD + question + TAIL


def test_every_paper_benchmark_row_gets_a_clean_user_turn():
    """No benchmark row yields an empty or whitespace-padded question (the toolkit strips it)."""
    for benchmark in ("gsm8k", "math500", "svamp", "asdiv", "minerva_math", "olympiadbench", "mmlu_stem"):
        for row in load_benchmark(benchmark, DATA_DIR):
            question = row["toolkit_question"]
            assert question and question == question.strip(), (benchmark, row["id"])
            if benchmark == "mmlu_stem":
                assert question.count("\nAnswer Choices: (A) ") == 1 and " (D) " in question, row["id"]


def test_our_own_formatting_is_unchanged_for_chat_template(tiny_pair):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["expert"])
    row = row_with_id("svamp", "chal-777")
    text = eval_prompt(tokenizer, row, "svamp", "chat_template", "Be brief.")
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
        "There are 87 oranges and 290 bananas in Philip's collection. If the bananas are organized into 2 groups "
        "and oranges are organized into 93 groups How big is each group of bananas?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Tokenized exactly as apply_chat_template(tokenize=True) does.
    from lightreasoner_ray.data.prompts import prompt_ids

    assert encode_prompt(tokenizer, text, "chat_template") == prompt_ids(tokenizer, row["question"], "Be brief.")


def test_qwen25_math_cot_ignores_the_models_own_template(tiny_pair):
    """Same text whatever the model's template; for a ChatML model it tokenizes like the template would."""
    from transformers import AutoTokenizer

    from lightreasoner_ray.config import EVAL_SYSTEM_PROMPT
    from lightreasoner_ray.data.prompts import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["expert"])  # ChatML, as Qwen's
    row = row_with_id("gsm8k", "0")
    text = eval_prompt(tokenizer, row, "gsm8k", "qwen25-math-cot", EVAL_SYSTEM_PROMPT)
    ids = encode_prompt(tokenizer, text, "qwen25-math-cot")
    assert ids == prompt_ids(tokenizer, row["question"], EVAL_SYSTEM_PROMPT)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3

    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    assert eval_prompt(tokenizer, row, "gsm8k", "qwen25-math-cot", EVAL_SYSTEM_PROMPT) == text
    assert eval_prompt(tokenizer, row, "gsm8k", "chat_template", EVAL_SYSTEM_PROMPT).startswith("[system] Please")


def test_rows_without_the_toolkit_question_and_bad_styles_are_clear_errors():
    with pytest.raises(LightReasonerError, match="gsm8k row 'x' has no 'toolkit_question'"):
        eval_prompt(None, {"id": "x", "question": "q", "answer": "1"}, "gsm8k", "qwen25-math-cot", "")
    with pytest.raises(LightReasonerError, match="eval.prompt must be one of chat_template, qwen25-math-cot"):
        eval_prompt(None, {"id": "x", "question": "q"}, "gsm8k", "qwen", "")


def test_eval_prompt_config_key():
    assert load_config(None, []).eval.prompt == "chat_template"
    assert load_config(None, ["eval.prompt=qwen25-math-cot"]).eval.prompt == "qwen25-math-cot"
    with pytest.raises(LightReasonerError, match="eval.prompt must be one of chat_template, qwen25-math-cot"):
        load_config(None, ["eval.prompt=qwen"])
    with pytest.raises(LightReasonerError, match="eval.system_prompt is not used by eval.prompt=qwen25-math-cot"):
        load_config(None, ["eval.prompt=qwen25-math-cot", "eval.system_prompt=Be brief."])


def test_prediction_rows_record_the_exact_prompt(tiny_pair):
    """The evaluator (run in-process here) hands its prompt text to grading, which records it."""
    from lightreasoner_ray.engines.base import EngineSpec
    from lightreasoner_ray.engines.hf import HFEngine
    from lightreasoner_ray.core.scoring import grade_rows
    from lightreasoner_ray.stages.evaluation.pool import Evaluator

    rows = [row_with_id("mmlu_stem", "2516"), row_with_id("asdiv", "75")]
    spec = EngineSpec(model_path=str(tiny_pair["expert"]), max_new_tokens=4, batch_size=2)
    evaluator = Evaluator(HFEngine, spec, "unused", "qwen25-math-cot")
    generated = evaluator.generate(rows, "mixed")
    predictions = grade_rows("mmlu_stem", rows, generated)
    assert [p["prompt"] for p in predictions] == [
        HEAD + "Cat food costs $.47/lb. How much does a 6-lb bag cost?\n"
        "Answer Choices: (A) $2.82 (B) $2.97 (C) $6.47 (D) $12.77" + TAIL,
        HEAD + "Tessa has 4 apples. Anita gave her 5 more. She needs 10 apples to make a pie. Does she have "
        "enough to make a pie? (Yes or No)" + TAIL,
    ]
    assert [p["output"] for p in predictions] == [g["output"] for g in generated]

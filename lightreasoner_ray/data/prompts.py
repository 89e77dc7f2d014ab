"""Prompt building: the question through the model's chat template, or Qwen2.5-Math's fixed text."""

from __future__ import annotations

import logging
from typing import Any

from lightreasoner_ray.errors import LightReasonerError

logger = logging.getLogger(__name__)


def chat_messages(question: str, system_prompt: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    return messages


def prompt_ids(tokenizer: Any, question: str, system_prompt: str) -> list[int]:
    """Token ids of the chat prompt (system + user turn, assistant turn opened).

    Tokenizers without a chat template get a plain ``system\\n\\nquestion\\n`` prompt.
    """
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            chat_messages(question, system_prompt), add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = f"{system_prompt}\n\n{question}\n" if system_prompt else f"{question}\n"
    return tokenizer.encode(text, add_special_tokens=True)


# ---- evaluation prompts -----------------------------------------------------------------

# eval.prompt values. "chat_template": the question through the evaluated model's own chat
# template with eval.system_prompt. "qwen25-math-cot": the Qwen2.5-Math evaluation toolkit's
# protocol (evaluation/utils.py, PROMPT_TEMPLATES["qwen25-math-cot"]), which the paper's
# numbers come from: one fixed ChatML text for every model, whatever its own template,
# around the question as the toolkit formats it per benchmark (row["toolkit_question"],
# see benchmarks.toolkit_question).
PROMPT_STYLES = ("chat_template", "qwen25-math-cot")
QWEN25_MATH_COT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN25_MATH_COT_HEAD = "<|im_start|>system\n" + QWEN25_MATH_COT_SYSTEM + "<|im_end|>\n<|im_start|>user\n"
QWEN25_MATH_COT_TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def chat_prompt_text(tokenizer: Any, question: str, system_prompt: str) -> str:
    """The text ``prompt_ids`` tokenizes: the chat template rendered, or the plain fallback."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            chat_messages(question, system_prompt), add_generation_prompt=True, tokenize=False
        )
    return f"{system_prompt}\n\n{question}\n" if system_prompt else f"{question}\n"


def eval_prompt(tokenizer: Any, row: dict[str, Any], benchmark: str, style: str, system_prompt: str) -> str:
    """The exact prompt text an evaluated model is given for one benchmark row."""
    if style == "chat_template":
        return chat_prompt_text(tokenizer, row["question"], system_prompt)
    if style == "qwen25-math-cot":
        question = row.get("toolkit_question")
        if question is None:
            raise LightReasonerError(
                f"{benchmark} row {row.get('id')!r} has no 'toolkit_question' (rows from "
                "benchmarks.load_benchmark carry it); cannot build the qwen25-math-cot prompt"
            )
        # The toolkit strips spaces (only spaces) from both ends of the filled template.
        return (QWEN25_MATH_COT_HEAD + question + QWEN25_MATH_COT_TAIL).strip(" ")
    raise LightReasonerError(f"eval.prompt must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")


def encode_prompt(tokenizer: Any, text: str, style: str) -> list[int]:
    """Token ids of a prompt text from :func:`eval_prompt`.

    A rendered chat template already holds every special token it wants (a BOS
    included), so it is tokenized as ``apply_chat_template(tokenize=True)`` does,
    without adding any. The toolkit's fixed text goes to vLLM as a string, which adds
    the tokenizer's special tokens (nothing for Qwen tokenizers; the BOS for
    DeepSeek-R1-Distill's); so does the plain fallback prompt.
    """
    from_template = style == "chat_template" and bool(getattr(tokenizer, "chat_template", None))
    return [int(i) for i in tokenizer(text, add_special_tokens=not from_template)["input_ids"]]

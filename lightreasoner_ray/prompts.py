"""Prompt building: the question through the model's chat template."""

from __future__ import annotations

import logging
from typing import Any

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

"""What a model directory on disk is: a full Hugging Face model, or a PEFT adapter and its base."""

from __future__ import annotations

import json
from pathlib import Path

from lightreasoner_ray.errors import LightReasonerError

ADAPTER_CONFIG = "adapter_config.json"


def adapter_base_path(path: str) -> str | None:
    """The base model of a PEFT adapter directory, or None when ``path`` is not one."""
    config_file = Path(path).expanduser() / ADAPTER_CONFIG
    if not config_file.is_file():
        return None
    try:
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError) as exc:
        raise LightReasonerError(f"{config_file}: cannot read the adapter config ({exc})") from None
    if not base:
        raise LightReasonerError(f"{config_file}: field 'base_model_name_or_path' is missing or empty")
    return str(base)

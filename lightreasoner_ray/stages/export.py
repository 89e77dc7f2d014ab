"""``lightreasoner export``: merge a LoRA adapter into a standalone Hugging Face model.

The adapter is ``export.adapter`` (default ``<output_dir>/model``, where training puts
it); the base model is ``expert.path`` when given, else the base recorded in the
adapter's ``adapter_config.json``. The merged model and the tokenizer are written to
``export.output`` (default ``<output_dir>/merged``), replacing it whole: readers never
see a half-written directory. Beside the model goes ``lightreasoner_export.json`` (what was
merged); export replaces only a directory holding that mark (or an empty one), and refuses
anything else, so pointing ``export.output`` at a run's output_dir or other data loses nothing.

Beside the model goes its model card, ``README.md`` (stages.hub: the expert, the amateur, the
method's settings and the evaluation, from the run's records). ``export.merge=false`` copies the
adapter itself, with its card, instead of merging it. ``export.push_to_hub=REPO`` uploads the
exported directory to the Hub; whatever would stop the upload (offline, no token, the Hub
unreachable) is found before any merge work.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from lightreasoner_ray.config import Config
from lightreasoner_ray.engines.models import DTYPES, check_model_path, read_model_config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import local_dirs, storage, test_seam
from lightreasoner_ray.io.layout import PROVENANCE, RunLayout
from lightreasoner_ray.io.model_dirs import ADAPTER_CONFIG
from lightreasoner_ray.stages.hub import (
    check_push,
    hub_id,
    model_card,
    push_folder,
    read_run_records,
    write_card,
)

logger = logging.getLogger(__name__)

# Written into every exported model directory: what export may replace.
EXPORT_MARK = "lightreasoner_export.json"


def check_export_target(target: Path) -> None:
    """Refuse to replace ``target`` unless it is absent, empty, or a model directory export wrote."""
    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir() or target.is_symlink():
        raise LightReasonerError(f"export.output={target} exists and is not a directory; choose a new directory")
    entries = sorted(p.name for p in target.iterdir())
    if not entries or (target / EXPORT_MARK).is_file() or _is_unmarked_export(target, entries):
        return
    looks_like_run = {"samples", "model", "eval", "checkpoints", "sampling_settings.json", ".lightreasoner.lock",
                      "logs", "train_summary.json"} & set(entries)
    what = "a run's output_dir" if looks_like_run else "a directory"
    raise LightReasonerError(
        f"export.output={target} is {what} holding {len(entries)} entries ({', '.join(entries[:3])}"
        f"{', ...' if len(entries) > 3 else ''}) and no {EXPORT_MARK}, so `lightreasoner export` did not write it: "
        "refusing to replace it; choose a new or empty directory (the default is <output_dir>/merged)"
    )


# What an export written before the mark existed holds: a full model and its tokenizer, nothing else
# (what transformers' save_pretrained writes for a causal LM, its tokenizer, fast or slow, and its
# chat template, and the code files of a trust_remote_code model).
_MODEL_FILES = re.compile(
    r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
    r"pytorch_model.*\.bin(\.index\.json)?|tokenizer.*|special_tokens_map\.json|added_tokens\.json|"
    r"vocab\.(json|txt)|merges\.txt|spiece\.model|sentencepiece\.bpe\.model|[\w.-]+\.tiktoken|"
    r"chat_template\.(jinja|json)|(configuration|modeling|tokenization)_\w+\.py)$")


def _is_unmarked_export(target: Path, entries: list[str]) -> bool:
    return "config.json" in entries and all(_MODEL_FILES.match(name) and (target / name).is_file() for name in entries)


def export_paths(config: Config) -> tuple[str, str]:
    """(adapter directory, merged model directory) after applying the defaults; an adapter published
    to a URI is the version its ``CURRENT`` pointer names (io.storage.published_directory)."""
    layout = RunLayout(config.output_dir)
    adapter = storage.published_directory(config.export.adapter or layout.model)
    output = config.export.output or layout.merged
    return adapter, output


def _adapter_base(adapter: Path) -> str:
    """The base model the adapter names ("" when it names none: expert.path then names it), or why
    ``adapter`` is not an adapter. Stricter than io.model_dirs.adapter_base_path on purpose: export
    refuses a config without the field rather than merge into a guess."""
    adapter_config = adapter / ADAPTER_CONFIG
    if not adapter_config.is_file():
        if (adapter / "config.json").is_file():
            raise LightReasonerError(
                f"{adapter} is already a full model (config.json, no adapter_config.json): there is no adapter "
                "to merge. Full fine-tuning (train.lora.enabled=false) writes a standalone model directly."
            )
        raise LightReasonerError(f"export.adapter: {adapter} has no adapter_config.json (is it a PEFT adapter?)")
    try:
        return str(json.loads(adapter_config.read_text())["base_model_name_or_path"] or "")
    except (json.JSONDecodeError, KeyError) as exc:
        raise LightReasonerError(f"{adapter_config} is not a valid PEFT adapter config: {exc}") from None


def _load_dtype(requested: str, base: str, trust_remote_code: bool) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    stored = getattr(read_model_config(base, trust_remote_code), "dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def run_export(config: Config) -> dict[str, Any]:
    """Merge the adapter into its base model (or, with ``export.merge=false``, copy it) and save the
    result with its model card; upload it to ``export.push_to_hub`` when set; return what was done."""
    from transformers import AutoTokenizer

    started = time.time()
    adapter_path, output_path = export_paths(config)
    for name, value in (("export.adapter", adapter_path), ("export.output", output_path)):
        if "://" in value:
            raise LightReasonerError(f"{name}={value}: export works on local directories; copy the adapter locally first")
    adapter = Path(adapter_path).expanduser()
    check_export_target(Path(output_path).expanduser())  # before minutes of merging
    if not adapter.is_dir():
        raise LightReasonerError(f"export.adapter: {adapter} does not exist (train first, or set export.adapter)")
    recorded_base = _adapter_base(adapter)  # also rejects a full model given as the adapter
    base = config.expert.path or recorded_base
    if not base:
        raise LightReasonerError(f"{adapter}/adapter_config.json names no base model: set expert.path")
    check_model_path(base, "expert")
    repo_id = config.export.push_to_hub
    push = check_push(repo_id, "model") if repo_id else None  # before minutes of merging, too
    target = Path(output_path).expanduser()
    card = model_card(base=base, adapter=str(adapter), output=str(target), merged=config.export.merge,
                      records=read_run_records(str(adapter.parent), str(adapter)),
                      adapter_config=json.loads((adapter / ADAPTER_CONFIG).read_text()), model_name=repo_id)
    trust = config.expert.trust_remote_code
    dtype = _load_dtype(config.export.dtype, base, trust)
    merged = _merge(adapter, base, dtype, trust) if config.export.merge else None
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source), trust_remote_code=trust)

    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in local_dirs.remove_leftovers(target):
        logger.info("removed %s, left by an interrupted export", leftover)
    mark = {"adapter": str(adapter), "base": base, "dtype": str(dtype).removeprefix("torch."),
            "merged": merged is not None, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    staging = local_dirs.staging_path(target)
    try:
        if merged is not None:
            merged.save_pretrained(staging)
        else:
            _copy_adapter(adapter, staging, base)
        tokenizer.save_pretrained(staging)
        (staging / EXPORT_MARK).write_text(json.dumps(mark, indent=2) + "\n", encoding="utf-8")
        write_card(staging, card)
        test_seam.reached("export.staged", output=str(target), staging=str(staging))
        check_export_target(target)  # again: something may have appeared there while merging
        local_dirs.replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = {
        "adapter": str(adapter),
        "base": base,
        "output": str(target),
        "dtype": mark["dtype"],
        "merged": merged is not None,
        "parameters": sum(p.numel() for p in merged.parameters()) if merged is not None else None,
        "wall_time_s": time.time() - started,
    }
    logger.info("%s adapter %s (base %s): %s", "merged" if merged is not None else "copied", adapter, base, target)
    if push is not None:
        summary["url"] = push_folder(push, target)
    return summary


def _merge(adapter: Path, base: str, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code)
        return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (OSError, ValueError) as exc:
        raise LightReasonerError(f"cannot merge adapter {adapter} into {base}: {exc}") from None


def _copy_adapter(adapter: Path, staging: Path, base: str) -> None:
    """The adapter's files (not the training's provenance record) into ``staging``; its config names the
    base by its Hub id where one is known, so the copy loads anywhere."""
    shutil.copytree(adapter, staging, ignore=shutil.ignore_patterns(".*", PROVENANCE))
    config_path = staging / ADAPTER_CONFIG
    adapter_config = json.loads(config_path.read_text())
    base_id = hub_id(base)
    if base_id and adapter_config.get("base_model_name_or_path") != base_id:
        adapter_config["base_model_name_or_path"] = base_id
        config_path.write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")

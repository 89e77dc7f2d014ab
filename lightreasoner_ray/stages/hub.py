"""Hub-ready outputs: the model card of an exported model or adapter, the dataset card of the
samples, and uploading either to the Hugging Face Hub.

The cards are ``README.md`` files with YAML metadata written through huggingface_hub's
``ModelCard`` / ``DatasetCard``, filled from what the run recorded (never from the config
used to export): the sampling record (``sampling_settings.json``), the samples' summary,
the training summary and the model's ``provenance.json``, and the evaluation's
``results.json`` (as the Hub's model-index). A setting no record holds is left out.

A push is checked before any work that takes time (offline, no token, an unreachable Hub or a
rejected token end the command at once with one line); an upload that fails afterwards keeps
what was written and says how to upload it by hand.

Nothing here writes into ``<output_dir>/model`` or ``<output_dir>/samples``: the model
directory's files identify the trained weights for resuming, and ``samples/`` stays a pure
Parquet dataset that other commands read as one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lightreasoner_ray.config import Config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import local_dirs, storage
from lightreasoner_ray.io.layout import PROVENANCE, RunLayout
from lightreasoner_ray.ui.reports import title

logger = logging.getLogger(__name__)

CARD = "README.md"
PAPER = "https://arxiv.org/abs/2510.07962"
TAGS = ("lightreasoner", "contrastive-distillation", "math", "reasoning")
# The samples' Parquet shards as the Hub's viewer and `datasets.load_dataset` find them.
SAMPLES_DATA_FILES = "*.parquet"

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_DIR = re.compile(r"^(?:models|datasets)--(.+?)--(.+)$")
_TRUE = {"1", "true", "yes", "on"}


# ---- reading what the run recorded ---------------------------------------------------------


@dataclass
class RunRecords:
    """The records a card is made from; each is ``{}`` when the run has none."""

    sampling: dict[str, Any] = field(default_factory=dict)  # sampling_settings.json
    samples_summary: dict[str, Any] = field(default_factory=dict)  # samples_summary.json
    training: dict[str, Any] = field(default_factory=dict)  # train_summary.json
    provenance: dict[str, Any] = field(default_factory=dict)  # <model>/provenance.json
    results: dict[str, Any] = field(default_factory=dict)  # eval/results.json


def _read_record(path: str) -> dict[str, Any]:
    if not storage.exists(path):
        return {}
    try:
        record = storage.read_json(path)
    except LightReasonerError as exc:
        logger.warning("the card leaves out %s: %s", path, exc)
        return {}
    return record if isinstance(record, dict) else {}


def read_run_records(output_dir: str, model_dir: Optional[str] = None) -> RunRecords:
    """What the run in ``output_dir`` recorded; ``model_dir`` (default ``<output_dir>/model``) holds provenance.json."""
    layout = RunLayout(output_dir)
    provenance = os.path.join(model_dir, PROVENANCE) if model_dir else layout.model_provenance
    return RunRecords(
        sampling=_read_record(layout.sampling_settings),
        samples_summary=_read_record(layout.samples_summary),
        training=_read_record(layout.train_summary),
        provenance=_read_record(provenance),
        results=_read_record(layout.results["json"]),
    )


def hub_id(path: str, kind: str = "models") -> Optional[str]:
    """The Hub repo id ``path`` names, or None: the id itself (not a local path), or the id of a
    Hugging Face cache snapshot (``.../models--Org--Name/snapshots/<sha>``)."""
    if not path:
        return None
    if "://" not in path and _REPO_ID.match(path) and not Path(path).expanduser().exists():
        return path
    for part in reversed(Path(path).parts):
        match = _CACHE_DIR.match(part)
        if match and part.startswith(f"{kind}--"):
            return f"{match.group(1)}/{match.group(2)}"
    return None


def _display(path: str, kind: str = "models") -> str:
    return hub_id(path, kind) or Path(str(path).rstrip("/")).name or str(path)


# ---- the model card --------------------------------------------------------------------------


def _same_path(a: Any, b: Any) -> bool:
    if not a or not b:
        return False
    try:
        return Path(str(a)).expanduser().resolve() == Path(str(b)).expanduser().resolve()
    except OSError:
        return str(a) == str(b)


def evaluated_tag(results: dict[str, Any], paths: list[str]) -> Optional[str]:
    """The tag in ``results.json`` whose model is one of ``paths``."""
    for tag, model in (results.get("models") or {}).items():
        if isinstance(model, dict) and any(_same_path(model.get("path"), path) for path in paths):
            return tag
    return None


def _metric_name(settings: dict[str, Any]) -> str:
    n = settings.get("n") or 1
    if n > 1:
        return f"pass@1 (zero-shot, mean of {n} samples, temperature {settings.get('temperature')})"
    return "pass@1 (zero-shot, greedy)"


def eval_results(results: dict[str, Any], tag: str) -> list[Any]:
    """The Hub's model-index entries (accuracy in %) of model ``tag`` in ``results.json``."""
    from huggingface_hub import EvalResult

    settings = results.get("settings") or {}
    entries = []
    for benchmark, scores in ((results.get("models") or {}).get(tag, {}).get("benchmarks") or {}).items():
        metrics = [("accuracy", _metric_name(settings), scores.get("accuracy"))]
        if "k" in scores:
            metrics += [(f"pass@{scores['k']}", f"pass@{scores['k']}", scores.get("pass@k")),
                        (f"maj@{scores['k']}", f"maj@{scores['k']}", scores.get("maj@k"))]
        for metric_type, metric_name, value in metrics:
            if isinstance(value, (int, float)):
                entries.append(EvalResult(
                    task_type="text-generation", task_name="Mathematical reasoning",
                    dataset_type=benchmark, dataset_name=title(benchmark), dataset_split="test",
                    metric_type=metric_type, metric_name=metric_name, metric_value=round(100 * value, 2),
                ))
    return entries


def _settings_rows(records: RunRecords, adapter_config: dict[str, Any]) -> list[tuple[str, Any]]:
    sampling, training = records.sampling, records.training
    counts = records.samples_summary.get("counts") or {}
    train_config = training.get("train_config") or {}
    lora = train_config.get("lora") or {}
    rows: list[tuple[str, Any]] = [
        ("problems", sampling.get("problems_source") or records.samples_summary.get("problems_source")),
        ("β (KL threshold for a step)", sampling.get("beta")),
        ("α (plausibility mask)", sampling.get("alpha")),
        ("step selection", sampling.get("selection")),
        ("max new tokens (sampling)", sampling.get("max_new_tokens")),
        ("rollouts", _rollouts(sampling)),
        ("problems sampled", counts.get("problems")),
        ("completion tokens sampled", counts.get("completion_tokens")),
        ("selected steps", counts.get("selected_steps")),
        ("updates", training.get("steps")),
        ("tuned tokens (selected steps trained on)", training.get("tuned_tokens")),
        ("selected steps per update", train_config.get("steps_per_update")),
        ("learning rate", train_config.get("lr")),
        ("LR schedule", train_config.get("lr_schedule")),
        ("LoRA r / alpha / dropout", "/".join(str(lora[k]) for k in ("r", "alpha", "dropout")) if lora else None),
        ("LoRA target modules", ", ".join(lora.get("target_modules") or adapter_config.get("target_modules") or [])
         or None),
        ("precision", training.get("precision")),
        ("DeepSpeed ZeRO stage", training.get("deepspeed_stage")),
        ("training workers", training.get("workers")),
        ("final loss", round(training["final_loss"], 6) if isinstance(training.get("final_loss"), float) else None),
        ("loss", _loss(train_config)),
    ]
    return [(name, value) for name, value in rows if value not in (None, "", [])]


def _rollouts(sampling: dict[str, Any]) -> Optional[str]:
    """How the expert's solutions were drawn (the record names a temperature only for sampled ones)."""
    if not sampling:
        return None
    if not sampling.get("temperature"):
        return "greedy"
    return f"sampled: temperature {sampling['temperature']}, top-p {sampling.get('top_p', 1.0)}, seed {sampling.get('seed', 0)}"


def _loss(train_config: dict[str, Any]) -> Optional[str]:
    """The training loss when it is not the paper's plain forward KL."""
    divergence, anchor = train_config.get("divergence", "forward_kl"), train_config.get("anchor_weight") or 0
    if divergence == "forward_kl" and not anchor:
        return None
    name = {"forward_kl": "KL(label ‖ model)", "reverse_kl": "reverse KL on the label's support",
            "jsd": f"generalised JSD (β {train_config.get('jsd_beta', 0.5)})"}.get(divergence, divergence)
    return name + (f" + {anchor} × KL(expert ‖ model)" if anchor else "")


def _solutions(sampling: dict[str, Any]) -> str:
    return "sampled" if sampling.get("temperature") else "greedy"


def _results_table(results: dict[str, Any], tags: list[tuple[str, str]]) -> str:
    benchmarks = [b for b in results.get("benchmarks") or [] if any(
        b in ((results.get("models") or {}).get(tag, {}).get("benchmarks") or {}) for _, tag in tags)]
    if not benchmarks:
        return ""
    lines = ["| model | " + " | ".join(title(b) for b in benchmarks) + " |",
             "|---|" + "---|" * len(benchmarks)]
    for name, tag in tags:
        scores = (results["models"][tag].get("benchmarks") or {})
        cells = [f"{100 * scores[b]['accuracy']:.1f}" if b in scores else "–" for b in benchmarks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(*, base: str, adapter: str, output: str, merged: bool, records: RunRecords,
               adapter_config: Optional[dict[str, Any]] = None, model_name: str = "") -> Any:
    """The model card (a ``huggingface_hub.ModelCard``) of the model exported from ``adapter`` into ``output``."""
    from huggingface_hub import ModelCard, ModelCardData

    adapter_config = adapter_config or {}
    amateur = records.sampling.get("amateur") or (records.samples_summary.get("models") or {}).get("amateur") or ""
    base_id = hub_id(base)
    problems = records.sampling.get("problems_source") or ""
    dataset_id = hub_id(problems, "datasets")
    lora = str(adapter_config.get("peft_type", "LORA")).upper() == "LORA"
    repo = model_name or "path/to/this/directory"
    model_name = model_name or f"{_display(base).rsplit('/', 1)[-1]}-lightreasoner"
    tags = list(TAGS) + (["lora"] if lora else []) + ([] if merged else ["peft"])
    tag = evaluated_tag(records.results, [adapter, output])
    base_tag = evaluated_tag(records.results, [base, records.sampling.get("expert") or base])
    data = ModelCardData(
        model_name=model_name,
        base_model=base_id,
        base_model_relation=None if base_id is None else ("finetune" if merged else "adapter"),
        library_name="transformers" if merged else "peft",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        eval_results=eval_results(records.results, tag) or None if tag else None,
        amateur_model=_display(amateur) if amateur else None,
    )
    settings = _settings_rows(records, adapter_config)
    body = [
        f"# {model_name}",
        "",
        (f"`{_display(base)}` (the expert) improved with [LightReasoner]({PAPER}): the expert is trained towards "
         f"contrastive soft labels at the steps of its own {_solutions(records.sampling)} solutions where it disagrees "
         "most with a weaker "
         f"amateur model{f', `{_display(amateur)}`' if amateur else ''} (KL(expert ‖ amateur) > β). No "
         "ground-truth answers are used."),
        "",
        "This repository holds " + ("the adapter merged into the expert: a standalone model." if merged else
                                    "the LoRA adapter; load it on top of the expert."),
        "",
        "## Method and settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| expert (base model) | `{base_id or base}` |",
        f"| amateur | `{_display(amateur) if amateur else 'not recorded'}` |",
        *[f"| {name} | {value} |" for name, value in settings],
    ]
    if tag:
        shown = ([("expert", base_tag)] if base_tag and base_tag != tag else []) + [("this model", tag)]
        body += ["", "## Evaluation", "",
                 f"LightReasoner's evaluation: {_metric_name(records.results.get('settings') or {})}, accuracy in %.",
                 "",
                 _results_table(records.results, shown)]
    usage = ('model = AutoModelForCausalLM.from_pretrained("{repo}")' if merged else
             f'model = AutoPeftModelForCausalLM.from_pretrained("{{repo}}")  # loads {base_id or base} too')
    body += ["", "## Use", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer" if merged else
             "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer",
             usage, 'tokenizer = AutoTokenizer.from_pretrained("{repo}")', "```", ""]
    text = "\n".join(body).replace("{repo}", repo)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def write_card(directory: Path, card: Any) -> Path:
    """Write a model or dataset card as ``directory/README.md``."""
    path = Path(directory) / CARD
    path.write_text(str(card), encoding="utf-8")
    return path


# ---- the dataset card ------------------------------------------------------------------------


_SCHEMA = """| column | type | meaning |
|---|---|---|
| problem_id | string | the problem's id |
| prompt_ids | list<int32> | the prompt, the expert's chat template applied |
| completion_ids | list<int32> | the expert's completion (greedy, or sampled: see the settings) |
| steps | list<int32> | selected positions t (indices into completion_ids) |
| kl | list<float32> | KL(expert ‖ amateur) at each selected step |
| target_ids | list<list<int32>> | support of the contrastive soft label at each selected step |
| target_probs | list<list<float32>> | the soft label on that support (sums to 1) |
| position_kl | list<float32> | KL at every completion position (to choose β afterwards) |"""


def dataset_card(records: RunRecords, rows: int, name: str = "") -> Any:
    """The dataset card (a ``huggingface_hub.DatasetCard``) of a LightReasoner samples dataset of ``rows`` rows."""
    from huggingface_hub import DatasetCard, DatasetCardData

    sampling = records.sampling
    expert, amateur = sampling.get("expert") or "", sampling.get("amateur") or ""
    problems = sampling.get("problems_source") or ""
    dataset_id = hub_id(problems, "datasets")
    size = next(label for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                                           (1_000_000, "100K<n<1M"), (float("inf"), "n>1M")) if rows < limit)
    data = DatasetCardData(
        pretty_name=name or "LightReasoner contrastive samples",
        tags=list(TAGS),
        task_categories=["text-generation"],
        size_categories=[size],
        source_datasets=[dataset_id] if dataset_id else None,
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": SAMPLES_DATA_FILES}]}],
        expert_model=_display(expert) if expert else None,
        amateur_model=_display(amateur) if amateur else None,
    )
    counts = records.samples_summary.get("counts") or {}
    settings = [
        ("expert", f"`{_display(expert)}`" if expert else None),
        ("amateur", f"`{_display(amateur)}`" if amateur else None),
        ("problems", problems or None),
        ("β (KL threshold for a step)", sampling.get("beta")),
        ("α (plausibility mask)", sampling.get("alpha")),
        ("step selection", sampling.get("selection")),
        ("max new tokens", sampling.get("max_new_tokens")),
        ("vocabulary (ids the distributions cover)", sampling.get("vocab_size")),
        ("trajectories", rows),
        ("completion tokens", counts.get("completion_tokens")),
        ("selected steps", counts.get("selected_steps")),
    ]
    body = [
        f"# {data.pretty_name}",
        "",
        (f"Samples of [LightReasoner]({PAPER}): one row per problem, the expert's {_solutions(records.sampling)} "
         "solution and, at the "
         "steps where the expert and the amateur disagree most (KL(expert ‖ amateur) > β), the contrastive soft "
         "label the expert is trained towards. Token ids are the expert's tokenizer's."),
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in settings if value not in (None, "")],
        "",
        "## Columns",
        "",
        _SCHEMA,
        "",
        "## Load",
        "",
        "```python",
        "from datasets import load_dataset",
        f'rows = load_dataset("{name or "<repo id or this directory>"}", split="train")',
        "```",
        "",
    ]
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def export_samples(config: Config) -> dict[str, Any]:
    """``lightreasoner export-samples``: ``<output_dir>/samples``' Parquet shards and a dataset card in
    ``<output_dir>/samples_dataset`` (replaced whole), uploaded to ``export.push_to_hub`` when set."""
    layout = RunLayout(config.output_dir)
    if storage.is_uri(config.output_dir):
        raise LightReasonerError(f"output_dir={config.output_dir}: export-samples works on a local output_dir; "
                                 "copy the samples locally first")
    files = storage.list_parquet_files(layout.samples)
    if not files:
        raise LightReasonerError(f"no samples in {layout.samples}: run `lightreasoner sample` (or `run`) first")
    repo_id = config.export.push_to_hub
    push = check_push(repo_id, "dataset") if repo_id else None
    rows = sum(storage.read_parquet(path, columns=["problem_id"]).num_rows for path in files)
    card = dataset_card(read_run_records(config.output_dir), rows, repo_id)
    target = Path(layout.samples_dataset)
    for leftover in local_dirs.remove_leftovers(target):
        logger.info("removed %s, left by an interrupted export-samples", leftover)
    staging = local_dirs.staging_path(target)
    try:
        staging.mkdir(parents=True)
        for path in files:
            _link_or_copy(Path(path), staging / Path(path).name)
        write_card(staging, card)
        local_dirs.replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary: dict[str, Any] = {"directory": str(target), "rows": rows, "files": len(files)}
    if push is not None:
        summary["url"] = push_folder(push, target)
    logger.info("samples dataset: %s (%d rows)", target, rows)
    return summary


def _link_or_copy(source: Path, destination: Path) -> None:
    """A hard link where the filesystem allows one (the shards are never rewritten in place), else a copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


# ---- pushing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubPush:
    """A checked upload target: the repo, its type and a client holding a token the Hub accepted."""

    repo_id: str
    repo_type: str
    api: Any
    token: str


def hub_offline() -> bool:
    """Whether the Hub is switched off here (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or any(
        os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_push(repo_id: str, repo_type: str = "model", key: str = "export.push_to_hub") -> HubPush:
    """Everything an upload to ``repo_id`` needs, checked before any work: a valid repo id, the Hub
    switched on, a token, the Hub reachable and the token accepted. One line naming what is wrong."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    where = f"{key}={repo_id}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise LightReasonerError(f"{where}: not a Hub repo id (expected user/name or org/name)") from None
    if hub_offline():
        raise LightReasonerError(f"{where}: the Hugging Face Hub is switched off here (HF_HUB_OFFLINE or "
                                 "TRANSFORMERS_OFFLINE is set); unset it to push, or export without pushing")
    token = huggingface_hub.get_token()
    if not token:
        raise LightReasonerError(f"{where}: no Hugging Face token; run `hf auth login` or set HF_TOKEN "
                                 "(a token with write access)")
    api = huggingface_hub.HfApi(token=token)
    try:
        identity = api.whoami(token=token)
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise LightReasonerError(f"{where}: the Hub rejected the token (HTTP 401); log in again with "
                                     "`hf auth login` or set a valid HF_TOKEN") from None
        raise LightReasonerError(f"{where}: the Hub at {api.endpoint} answered HTTP {status}: "
                                 f"{_first_line(exc)}") from None
    except Exception as exc:  # connection refused, DNS, TLS, timeouts: all mean "not reachable from here"
        raise LightReasonerError(f"{where}: the Hugging Face Hub at {api.endpoint} is unreachable "
                                 f"({type(exc).__name__}: {_first_line(exc)}); check the network or proxy, "
                                 "or export without pushing") from None
    role = ((identity or {}).get("auth") or {}).get("accessToken", {}).get("role") if isinstance(identity, dict) else None
    if role == "read":
        raise LightReasonerError(f"{where}: the Hugging Face token is read-only; use a token with write access "
                                 "(`hf auth login`, or HF_TOKEN)")
    return HubPush(repo_id=repo_id, repo_type=repo_type, api=api, token=token)


def push_folder(push: HubPush, folder: Path) -> str:
    """Create the repo (if needed) and upload ``folder`` to it; the repo's URL. A failure keeps ``folder``
    and says how to upload it by hand."""
    kind = "" if push.repo_type == "model" else f" --repo-type {push.repo_type}"
    try:
        push.api.create_repo(push.repo_id, repo_type=push.repo_type, exist_ok=True, token=push.token)
        push.api.upload_folder(repo_id=push.repo_id, folder_path=str(folder), repo_type=push.repo_type,
                               token=push.token, commit_message="Upload from lightreasoner")
    except Exception as exc:  # the Hub's HTTP errors, the network's, a full quota: the export is kept either way
        raise LightReasonerError(
            f"uploading {folder} to the Hub repo {push.repo_id} failed ({type(exc).__name__}: {_first_line(exc)}); "
            f"{folder} is kept: upload it with `hf upload {push.repo_id} {folder}{kind}`") from None
    prefix = "" if push.repo_type == "model" else f"{push.repo_type}s/"
    url = f"{push.api.endpoint.rstrip('/')}/{prefix}{push.repo_id}"
    logger.info("uploaded %s to %s", folder, url)
    return url


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

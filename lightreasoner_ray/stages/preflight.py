"""Pre-flight checks: what can be known about a run before it starts, in seconds, without loading
model weights. ``lightreasoner check`` reports them all, one line per problem; ``run`` performs
them first and refuses to start on any.

Each check reuses the stage's own validator (model paths, tokenizers, weights, LoRA targets and
DeepSpeed settings; the problems and benchmark loaders; the engine registry), so a check and the
stage it stands for can never disagree. What is checked:

- the models: paths (local directories or hub names), weights present, tokenizers shared and
  fitting both embeddings, LoRA targets, vLLM's CPU head sizes; training settings DeepSpeed refuses;
- the problems file (every row, the prompts against the models' context) and every benchmark file;
- output_dir: writable, and not locked by a running command (probed without taking the lock);
- the extras the config needs (vLLM, DeepSpeed, the tracking packages);
- the cluster: what each stage asks (actors or workers x CPUs/GPUs) against the nodes of the
  connected cluster (or of the local Ray a run would start here), and the model directories
  present on every alive node.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from lightreasoner_ray.config import Config, check_backends_installed
from lightreasoner_ray.data.benchmarks import load_benchmark
from lightreasoner_ray.data.problems import check_gold_answers, load_problems
from lightreasoner_ray.engines.models import (
    check_local_model,
    check_model_path,
    check_tokenizers_compatible,
    load_tokenizer,
)
from lightreasoner_ray.engines.registry import resolve_engine_factory
from lightreasoner_ray.engines.vllm import check_cpu_head_size
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.io.lock import read_holder
from lightreasoner_ray.io.model_dirs import adapter_base_path
from lightreasoner_ray.stages.problem_prompts import prepare_problems
from lightreasoner_ray.stages.ray_helpers import (
    describe_cluster,
    init_ray,
    node_resources,
)
from lightreasoner_ray.stages.training.deepspeed_config import check_supported

logger = logging.getLogger(__name__)

# How long the per-node path check waits for every node to answer.
NODE_CHECK_TIMEOUT_S = 60.0

Check = Callable[[Config], None]


@dataclass
class PreflightReport:
    """Problems (the run would fail), warnings (it would run, not as configured) and what was checked."""

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    asks: list[str] = field(default_factory=list)  # what the stages ask of the cluster
    seconds: float = 0.0

    def problem(self, message: str) -> None:
        message = " ".join(str(message).split())  # one line, whatever the source wrote
        if message not in self.problems:
            self.problems.append(message)

    def attempt(self, what: str, check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one check; its refusal (or any error reading the input) becomes one problem line.
        Returns the check's result, or None when it failed."""
        try:
            result = check(*args, **kwargs)
        except LightReasonerError as exc:
            self.problem(str(exc))
            return None
        except Exception as exc:  # a malformed config.json or tokenizer file: name what was read
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            self.problem(f"{what}: {type(exc).__name__}: {first}")
            return None
        return result if result is not None else True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preflight(config: Config, extra_checks: Sequence[tuple[str, Check]] = (), for_run: bool = False) -> PreflightReport:
    """Every pre-flight check of ``config``; nothing is raised, every problem is collected.

    ``extra_checks`` are further ``(name, check)`` pairs (the pipeline's own start checks).
    ``for_run`` is the run's own pre-flight: the output_dir lock is not probed (the run holds it),
    the cluster is connected as the run connects (and stays so), and what the cluster cannot place
    is a warning only, since a stage waits for an autoscaler to add nodes.
    """
    started = time.time()
    report = PreflightReport()
    report.attempt("extras", check_extras, config, report)
    models_ok = report.attempt("models", check_models, config, report) is True
    report.attempt("data", check_data, config, report, models_ok)
    report.attempt("output_dir", check_output_dir, config, report, probe_lock=not for_run)
    for name, check in extra_checks:
        report.attempt(name, check, config)
    report.attempt("cluster", check_cluster, config, report, for_run=for_run)
    report.seconds = time.time() - started
    return report


def require_preflight(config: Config, extra_checks: Sequence[tuple[str, Check]] = ()) -> PreflightReport:
    """The run's pre-flight: raise one :class:`LightReasonerError` naming every problem found."""
    report = preflight(config, extra_checks, for_run=True)
    for warning in report.warnings:
        logger.warning("%s", warning)
    if len(report.problems) == 1:
        raise LightReasonerError(report.problems[0])
    if report.problems:
        raise LightReasonerError(
            f"{len(report.problems)} problems found before starting (`lightreasoner check` lists them one a line): "
            + " | ".join(report.problems)
        )
    logger.info("pre-flight checks passed in %.1fs", report.seconds)
    return report


# ---- extras --------------------------------------------------------------------------------


def _module_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken install
        return False


def check_extras(config: Config, report: PreflightReport) -> None:
    """vLLM (or an engine factory) where an engine asks for it, DeepSpeed, the tracking packages."""
    engines = [("sampling.engine", config.sampling.engine), ("eval.engine", config.eval.engine)]
    if config.rejection_sft.enabled and config.rejection_sft.engine:
        engines.append(("rejection_sft.engine", config.rejection_sft.engine))
    for key, name in engines:
        if name != "hf":
            report.attempt(key, resolve_engine_factory, name, key)
    if not _module_installed("deepspeed"):
        report.problem("training runs DeepSpeed, which is not installed: pip install 'deepspeed>=0.16' "
                       "(a dependency of lightreasoner-ray; reinstall the package)")
    report.attempt("tracking.backend", check_backends_installed, config.tracking.backends, "tracking")
    engine_names = sorted({name for _, name in engines})
    report.checked.append(f"extras: engines {', '.join(engine_names)}; deepspeed; tracking "
                          f"{', '.join(config.tracking.backends) or 'none'}")


# ---- models --------------------------------------------------------------------------------


def _is_local_dir(path: str) -> bool:
    return bool(path) and Path(path).expanduser().is_dir()


def check_models(config: Config, report: PreflightReport) -> bool:
    """The pair's paths, tokenizers (shared, fitting both embeddings), weights present, LoRA targets,
    the training settings DeepSpeed refuses and vLLM's CPU head sizes; True when the pair is usable."""
    before = len(report.problems)
    tokenizers = {}
    for role, model in (("expert", config.expert), ("amateur", config.amateur)):
        if report.attempt(f"{role}.path", check_model_path, model.path, role) is None:
            continue
        base = adapter_base_path(model.path) if _is_local_dir(model.path) else None
        if base is not None:
            report.problem(f"{role}.path {model.path} is a LoRA adapter (of {base}): the {role} must be a full "
                           "model; merge the adapter first (`lightreasoner export`)")
            continue
        tokenizers[role] = report.attempt(f"{role} tokenizer", load_tokenizer, model, role)
    expert_tokenizer, amateur_tokenizer = tokenizers.get("expert"), tokenizers.get("amateur")
    if expert_tokenizer is not None and amateur_tokenizer is not None:
        report.attempt("tokenizers", check_tokenizers_compatible, expert_tokenizer, amateur_tokenizer,
                       config.expert.path, config.amateur.path)
    if expert_tokenizer is not None:
        # As the sampler does: the expert's tokenizer ids index both models' embeddings.
        report.attempt("expert model", check_local_model, config.expert, "expert", expert_tokenizer)
        if amateur_tokenizer is not None:
            report.attempt("amateur model", check_local_model, config.amateur, "amateur", expert_tokenizer)
        if config.train.lora.enabled:
            report.attempt("train.lora.target_modules", _check_lora_targets, config)
    report.attempt("train", check_supported, config.train, config.expert.dtype)
    if expert_tokenizer is not None:
        for key, engine, gpus in (("sampling", config.sampling.engine, config.sampling.gpus_per_actor),
                                  ("eval", config.eval.engine, config.eval.gpus_per_actor)):
            if engine == "vllm" and gpus == 0 and _is_local_dir(config.expert.path) and _module_installed("vllm"):
                report.attempt(f"{key}.engine", check_cpu_head_size, config.expert.path,
                               config.expert.trust_remote_code)
    ok = len(report.problems) == before
    if ok:
        report.checked.append(
            f"models: expert {config.expert.path} and amateur {config.amateur.path} (shared tokenizer of "
            f"{len(expert_tokenizer)} tokens, weights present, no weights loaded)")
    return ok


def _check_lora_targets(config: Config) -> None:
    from lightreasoner_ray.stages.training.driver import (
        check_lora_targets,  # imports Ray Train
    )

    check_lora_targets(config)


# ---- problems and benchmarks ----------------------------------------------------------------


def check_data(config: Config, report: PreflightReport, models_ok: bool) -> None:
    """Every problem row (and, with usable models, every prompt against the context) and every
    benchmark file, read whole by the stages' own loaders."""
    with_answers = config.rejection_sft.enabled
    if models_ok:
        prepared = report.attempt("data.problems", prepare_problems, config, with_answers)
        if prepared is not None:
            problems, info = prepared
            longest = max((len(p["prompt_ids"]) for p in problems), default=0)
            report.checked.append(f"problems: {len(problems)} from {info['source']} (longest prompt {longest} of "
                                  f"{info['context']} context tokens"
                                  + (", gold answers present" if with_answers else "") + ")")
    else:  # the rows can still be read without the tokenizers
        loaded = report.attempt("data.problems", load_problems, config.data)
        if loaded is not None:
            if with_answers:
                report.attempt("data.answer_field", check_gold_answers, config.data)
            report.checked.append(f"problems: {len(loaded.problems)} from {loaded.source}")
    counts = []
    for name in config.eval.benchmarks:
        rows = report.attempt(f"benchmark {name}", load_benchmark, name, config.eval.data_dir or None, config.eval.limit)
        if rows is not None and len(rows) == 0:
            report.problem(f"benchmark {name} has no rows (data_dir {config.eval.data_dir or 'default'})")
        elif rows is not None:
            counts.append(f"{name} {len(rows)}")
    if counts:
        report.checked.append(f"benchmarks: {', '.join(counts)} rows")
    if config.train.samples and not storage.exists(config.train.samples):
        report.problem(f"train.samples {config.train.samples} does not exist")


# ---- output_dir ------------------------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def lock_holder(output_dir: str) -> Optional[dict[str, Any]]:
    """The holder of ``output_dir``'s lock when a live process holds it, else None; the lock is
    probed, not taken: a shared ``flock`` that fails at once means an exclusive holder, and it is
    released at once when it succeeds (nothing is written). Returns ``{}`` when the holder is
    unknown (a held lock whose record is unreadable)."""
    path = Path(RunLayout(output_dir).lock).expanduser()
    if storage.is_uri(output_dir):
        return (read_holder(output_dir) or {}) if storage.exists(RunLayout(output_dir).lock) else None
    if not path.is_file():
        return None
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return read_holder(output_dir) or {}
            return None  # no file locks on this filesystem: the lock itself will say so
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_output_dir(config: Config, report: PreflightReport, probe_lock: bool = True) -> None:
    """output_dir (or its nearest existing parent) is a writable directory, and no command holds its lock."""
    output_dir = config.output_dir
    before = len(report.problems)
    if not storage.is_uri(output_dir):
        local = Path(output_dir).expanduser()
        existing = _existing_ancestor(local)
        if not existing.is_dir():
            report.problem(f"output_dir {output_dir} is not writable: {existing} is a file, not a directory")
        else:
            try:
                with tempfile.TemporaryFile(dir=existing):
                    pass
            except OSError as exc:
                report.problem(f"output_dir {output_dir} is not writable: cannot create files in {existing} "
                               f"({exc.strerror or exc})")
    if probe_lock:
        holder = report.attempt("output_dir lock", lock_holder, output_dir) if len(report.problems) == before else None
        holder = None if holder is True else holder
        if holder is not None:
            who = (f"`lightreasoner {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on host "
                   f"{holder.get('host', '?')}, since {holder.get('started', '?')})") if holder else "another process"
            report.problem(f"output_dir {output_dir} is in use by {who}: wait for it to finish, or use another "
                           f"output_dir (lock: {RunLayout(output_dir).lock})")
    if len(report.problems) == before:
        report.checked.append(f"output_dir {output_dir}: writable" + (", not locked" if probe_lock else ""))


# ---- the cluster -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """What one stage asks of the cluster: ``count`` actors (or workers, or tasks) of one shape."""

    stage: str
    what: str
    count: int
    cpus: float
    gpus: float
    keys: str  # the settings that give the shape, for the message
    # Ray Train places all its workers at once; actor pools start with the actors that fit.
    all_at_once: bool = False
    # Whether what runs there loads a model (the grading task does not).
    loads_models: bool = True

    def describe(self) -> str:
        return f"{self.stage}: {self.count} {self.what}(s) x ({self.cpus:g} CPU, {self.gpus:g} GPU)"


def stage_asks(config: Config) -> list[Ask]:
    """What the stages of a run ask of the cluster, one stage after the other."""
    sampling, train, evaluation = config.sampling, config.train, config.eval
    sampling_stage = "sampling" + (" and rejection sampling" if config.rejection_sft.enabled else "")
    return [
        Ask(sampling_stage, "sampler actor", sampling.num_actors, sampling.cpus_per_actor, sampling.gpus_per_actor,
            "sampling.num_actors, sampling.cpus_per_actor, sampling.gpus_per_actor"),
        Ask("training", "DeepSpeed worker", train.num_workers, train.cpus_per_worker, train.gpus_per_worker,
            "train.num_workers, train.cpus_per_worker, train.gpus_per_worker", all_at_once=True),
        Ask("evaluation", "evaluator actor", evaluation.num_actors, evaluation.cpus_per_actor,
            evaluation.gpus_per_actor, "eval.num_actors, eval.cpus_per_actor, eval.gpus_per_actor"),
        Ask("evaluation", "grading task", 1, evaluation.grading_cpus, 0.0, "eval.grading_cpus", loads_models=False),
    ]


def fits_on_node(node: dict[str, float], cpus: float, gpus: float) -> int:
    """How many bundles of ``cpus`` CPUs and ``gpus`` GPUs one node holds at once (a fractional
    GPU share packs whole into one GPU, as Ray places it)."""
    limits = []
    if cpus > 0:
        limits.append(math.floor(node.get("CPU", 0.0) / cpus + 1e-9))
    if gpus > 0:
        whole_gpus = node.get("GPU", 0.0)
        if gpus < 1:
            limits.append(math.floor(whole_gpus + 1e-9) * math.floor(1 / gpus + 1e-9))
        else:
            limits.append(math.floor(whole_gpus / gpus + 1e-9))
    return min(limits) if limits else 1 << 30


def check_placement(asks: list[Ask], nodes: list[dict[str, float]], cluster: str) -> tuple[list[str], list[str]]:
    """(problems, warnings): the asks that no node can host, or not all at once where that is needed."""
    problems, warnings = [], []
    for ask in asks:
        placed = min(ask.count, sum(fits_on_node(node, ask.cpus, ask.gpus) for node in nodes))
        if placed == 0:
            problems.append(
                f"{ask.stage}: no node can host one {ask.what} ({ask.cpus:g} CPUs, {ask.gpus:g} GPUs: {ask.keys}); "
                f"{cluster} has {describe_cluster(nodes)}")
        elif placed < ask.count and ask.all_at_once:
            problems.append(
                f"{ask.stage}: only {placed} of {ask.count} {ask.what}s ({ask.cpus:g} CPUs, {ask.gpus:g} GPUs each: "
                f"{ask.keys}) fit at once and all start together; {cluster} has {describe_cluster(nodes)}")
        elif placed < ask.count:
            warnings.append(
                f"{ask.stage}: only {placed} of {ask.count} {ask.what}s ({ask.cpus:g} CPUs, {ask.gpus:g} GPUs each) fit "
                f"at once on {cluster}; the stage runs with {placed}")
    return problems, warnings


def _local_node(config: Config) -> dict[str, float]:
    """The one node of the local Ray that a run started here would start (``ray.num_cpus`` or the
    CPUs Ray detects; the visible GPUs)."""
    cpus: float
    if config.ray.num_cpus:
        cpus = float(config.ray.num_cpus)
    else:
        try:
            from ray._private.utils import (
                get_num_cpus,  # what Ray itself detects (cgroup limits included)
            )

            cpus = float(get_num_cpus())
        except Exception:
            cpus = float(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    import torch

    return {"CPU": cpus, "GPU": float(torch.cuda.device_count())}


def _node_paths(config: Config) -> dict[str, str]:
    """The local paths Ray workers open on whatever node they run: the model directories."""
    paths = {}
    for role, model in (("expert", config.expert), ("amateur", config.amateur)):
        if _is_local_dir(model.path):
            paths[f"{role} model directory"] = model.path
    return paths


def missing_paths(paths: dict[str, str]) -> list[str]:
    """The entries of ``paths`` (what -> path) that are not there on this node."""
    return [what for what, path in paths.items() if not os.path.exists(os.path.expanduser(path))]


def _hosts_model_work(node: dict[str, Any], asks: Optional[Sequence[Ask]]) -> bool:
    """Whether one of the model-loading ``asks`` (sampler, worker, evaluator) fits on ``node`` (all do without asks)."""
    if asks is None:
        return True
    resources = node.get("Resources") or {}
    held = {"CPU": resources.get("CPU", 0.0), "GPU": resources.get("GPU", 0.0)}
    return any(fits_on_node(held, ask.cpus, ask.gpus) > 0 for ask in asks if ask.loads_models)


def check_nodes_have_paths(paths: dict[str, str], timeout_s: float = NODE_CHECK_TIMEOUT_S,
                           asks: Optional[Sequence[Ask]] = None) -> tuple[list[str], list[str]]:
    """One Ray task pinned to each alive node that can host model work (one of ``asks``) checks
    ``paths`` there. Returns the problems (one per path missing somewhere, naming the nodes) and
    the nodes that could not say (no answer within ``timeout_s``: a runtime environment still
    being built, a node leaving), which the caller weighs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not paths:
        return [], []
    nodes = [node for node in ray.nodes() if node.get("Alive") and _hosts_model_work(node, asks)]
    remote = ray.remote(num_cpus=0, max_retries=0)(missing_paths)
    refs = {remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(paths): node for node in nodes}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    missing_on: dict[str, list[str]] = {}
    problems, unanswered = [], []
    for ref in ready:
        node = refs[ref]
        try:
            missing = ray.get(ref)
        except Exception as exc:
            unanswered.append(f"node {node.get('NodeManagerAddress', node['NodeID'])}: the path check failed "
                              f"({type(exc).__name__})")
            continue
        for what in missing:
            missing_on.setdefault(what, []).append(node.get("NodeManagerAddress", node["NodeID"][:8]))
    for ref in pending:
        ray.cancel(ref, force=True)
        node = refs[ref]
        unanswered.append(f"node {node.get('NodeManagerAddress', node['NodeID'])} did not answer the path check "
                          f"within {timeout_s:g}s")
    for what, where in missing_on.items():
        problems.append(f"{what} {paths[what]} is missing on {len(where)} of {len(nodes)} nodes that can host "
                        f"model work ({', '.join(sorted(where))}): Ray workers there load it; put it on shared "
                        "storage or on every node")
    return problems, unanswered


def check_cluster(config: Config, report: PreflightReport, for_run: bool = False) -> None:
    """The stages' asks against the connected cluster's nodes (connecting only where the run would
    connect: ``ray.address`` or ``RAY_ADDRESS``), or against the local Ray a run would start here."""
    import ray

    asks = stage_asks(config)
    address = config.ray.address or os.environ.get("RAY_ADDRESS") or ""
    connected_here = False
    if not ray.is_initialized() and address and address != "local":
        try:
            if for_run:
                init_ray(config.ray)  # as the run connects: it stays connected for the stages
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                connected_here = True
        except Exception as exc:
            report.problem(f"cannot connect to the Ray cluster at {address}: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
            return
    try:
        if ray.is_initialized():
            nodes, cluster = node_resources(), "the Ray cluster"
        else:
            nodes, cluster = [_local_node(config)], "the local Ray a run starts on this machine"
        problems, warnings = check_placement(asks, nodes, cluster)
        for message in problems:
            (report.warnings.append if for_run else report.problem)(message)
        report.warnings.extend(warnings)
        if ray.is_initialized():
            missing, unanswered = check_nodes_have_paths(_node_paths(config), asks=asks)
            for message in missing:
                report.problem(message)
            # A run goes on (its stages find out for themselves); check reports what it could not verify.
            for message in unanswered:
                (report.warnings.append if for_run else report.problem)(message)
        report.asks.append(f"{cluster}: {describe_cluster(nodes)}")
        report.asks.extend(f"{ask.describe()} asked" for ask in asks)
        if not problems and not warnings:
            report.checked.append(f"cluster: every stage's actors and workers fit on {cluster}")
    finally:
        if connected_here:
            ray.shutdown()

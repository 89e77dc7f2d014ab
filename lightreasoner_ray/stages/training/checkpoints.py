"""What a training checkpoint holds, and how the workers write and read it.

A checkpoint is one ``ray.train.report`` directory: the DeepSpeed state of every rank under
the tag ``deepspeed`` (frozen base weights left out under LoRA), the step counters in
``train_state.json``, and at the end the Hugging Face model (or PEFT adapter) with its
tokenizer under ``hf_model/``, which the driver publishes as ``<output_dir>/model``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from lightreasoner_ray.config import Config, TrainConfig, join_path
from lightreasoner_ray.core.schedule import lr_multiplier
from lightreasoner_ray.engines.models import load_tokenizer
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.test_seam import reached
from lightreasoner_ray.stages.training.zero3_weights import adapter_state_dict, save_model_shards

CHECKPOINT_TAG = "deepspeed"
TRAIN_STATE_FILE = "train_state.json"
MODEL_SUBDIR = "hf_model"
COMPLETE_MARKER = "complete_rank{rank}.json"
_MARKER_NAME = re.compile(r"^complete_rank\d+\.json(\.tmp)?$")

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What a checkpoint records beside DeepSpeed's own state (counters are global)."""

    step: int = 0
    tuned_steps: int = 0
    forward_tokens: int = 0
    train_time_s: float = 0.0
    loss: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def restore_checkpoint(engine: Any, lora: bool, train: Optional[TrainConfig] = None,
                       rank: int = 0, world_size: int = 1,
                       checkpoint_root: Optional[str] = None) -> tuple[TrainState, bool]:
    """The state of the newest complete checkpoint (a fresh one without), and whether it holds the final model.

    The candidates are the checkpoint Ray Train registered last and every ``step_*``
    checkpoint under ``checkpoint_root``, newest first: a checkpoint every worker finished
    writing is complete even when Ray Train had not registered it yet (it registers reported
    checkpoints asynchronously, so a node lost just after a save would otherwise send the
    restart back one checkpoint). A damaged candidate (a file missing, truncated or altered
    since it was written: see :func:`checkpoint_problem`) is skipped with a warning naming
    it and left in place. When Ray Train had registered a checkpoint and none is usable, the
    error names the directory to delete. Rank 0 lists the candidates and all ranks agree on
    each one before any of them loads it.

    A final model found in a checkpoint Ray Train did not register is not reported as
    present (the worker then saves the final checkpoint again, through Ray Train).

    With ``train``, the config's optimizer settings replace the checkpoint's (see
    :func:`apply_optimizer_settings`).
    """
    import ray.train

    latest = ray.train.get_checkpoint()
    candidates = _agreed_candidates(latest, checkpoint_root, rank, world_size)
    damaged: list[str] = []
    for checkpoint in candidates:
        registered = latest is not None and _same_path(checkpoint.path, latest.path)
        with checkpoint.as_directory() as directory:
            problem = checkpoint_problem(directory, rank, legacy_ok=registered)
            if not _all_ranks_agree(problem is None, world_size):
                problem = problem or "another worker found it damaged"
                if rank == 0:
                    logger.warning("checkpoint %s is damaged or incomplete (%s): skipping it", checkpoint.path,
                                   problem)
                damaged.append(f"{checkpoint.path} ({problem})")
                continue
            if damaged and rank == 0:
                logger.warning("resuming from the older checkpoint %s instead of %s, left in place",
                               checkpoint.path, "; ".join(damaged))
            if not registered and rank == 0:
                logger.info("resuming from %s, which every worker completed before Ray Train registered it",
                            checkpoint.path)
            with _weights_only_loading(engine):
                load_path, _ = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG, load_module_strict=not lora)
            if load_path is None:
                raise LightReasonerError(f"cannot load the DeepSpeed state from checkpoint {checkpoint.path}")
            state = TrainState(**json.loads(Path(directory, TRAIN_STATE_FILE).read_text()))
            if train is not None:
                apply_optimizer_settings(engine.lr_scheduler, train)
            return state, registered and Path(directory, MODEL_SUBDIR).is_dir()
    if latest is None:
        if damaged and rank == 0:
            logger.warning("no complete checkpoint under %s: training from update 0", checkpoint_root)
        return TrainState(), False
    root = str(latest.path).rsplit("/", 1)[0]
    raise LightReasonerError(
        f"the checkpoint {damaged[0]} is damaged and no older complete checkpoint is kept: delete {root} "
        "(or re-run with `lightreasoner train --restart`) to train from scratch"
    )


def _same_path(a: str, b: str) -> bool:
    return str(a).rstrip("/") == str(b).rstrip("/")


def _agreed_candidates(latest: Any, checkpoint_root: Optional[str], rank: int, world_size: int) -> list[Any]:
    """:func:`_candidates` as rank 0 lists them (every rank then checks the same ones in the same order)."""
    from ray.train import Checkpoint

    listed = [[(c.path, c is latest) for c in _candidates(latest, checkpoint_root)]] if rank == 0 else [None]
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(listed, src=0)
    filesystem = latest.filesystem if latest is not None else None
    result = []
    for path, is_latest in listed[0] or []:
        if is_latest and latest is not None:
            result.append(latest)
        else:
            result.append(Checkpoint(path=path, filesystem=filesystem or _filesystem_of(checkpoint_root)))
    return result


def _filesystem_of(root: Optional[str]) -> Any:
    from pyarrow import fs

    if root is None or not storage.is_uri(root):
        return fs.LocalFileSystem()
    return fs.FileSystem.from_uri(root)[0]


def _candidates(latest: Any, checkpoint_root: Optional[str] = None) -> Iterator[Any]:
    """Ray Train's latest checkpoint and every other ``step_*`` checkpoint beside it, newest first."""
    from pyarrow import fs
    from ray.train import Checkpoint

    if latest is not None:
        parent = str(latest.path).rstrip("/").rsplit("/", 1)[0]
        filesystem = latest.filesystem
    elif checkpoint_root is not None:
        filesystem, parent = None, checkpoint_root
    else:
        return
    try:  # a store that cannot be listed (credentials, region) leaves Ray Train's latest alone
        if filesystem is None:
            filesystem = _filesystem_of(checkpoint_root)
            if storage.is_uri(checkpoint_root):
                parent = fs.FileSystem.from_uri(checkpoint_root)[1]
        infos = filesystem.get_file_info(fs.FileSelector(parent, allow_not_found=True))
    except (OSError, ValueError) as exc:
        logger.warning("cannot list the checkpoints under %s (%s): resuming from Ray Train's latest only",
                       parent, exc)
        infos = []
    found = {info.path.rstrip("/"): info.base_name for info in infos
             if info.type == fs.FileType.Directory and _STEP_NAME.match(info.base_name)}
    if latest is not None:
        found.pop(str(latest.path).rstrip("/"), None)
        name = str(latest.path).rstrip("/").rsplit("/", 1)[-1]
        entries = [(name, latest)] if _STEP_NAME.match(name) else []
        if not entries:
            yield latest  # a registered checkpoint under another name still comes first
    else:
        entries = []
    entries += [(name, Checkpoint(path=path, filesystem=filesystem)) for path, name in found.items()]
    entries.sort(key=lambda entry: _step_key(entry[0]), reverse=True)
    for _, checkpoint in entries:
        yield checkpoint


_STEP_NAME = re.compile(r"^step_(\d+)(-final)?(?:-(\d+))?$")


def _step_key(name: str) -> tuple[int, int, int]:
    match = _STEP_NAME.match(name)
    assert match is not None
    return int(match.group(1)), 1 if match.group(2) else 0, int(match.group(3) or 0)


def _all_ranks_agree(ok: bool, world_size: int) -> bool:
    if world_size <= 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def checkpoint_problem(directory: str, rank: int, legacy_ok: bool = False) -> Optional[str]:
    """Why the checkpoint in ``directory`` is not complete and intact for ``rank``; None when it is.

    Complete means: ``train_state.json`` and a completion marker from every rank that
    wrote it (:data:`COMPLETE_MARKER`, written last and fsynced, listing that rank's files
    with their sizes and SHA-256), every listed file present at its size, and this rank's
    own files (the ones it will read) matching their digests. A checkpoint without any
    marker is accepted only as Ray Train's latest (``legacy_ok``: written before markers
    existed).
    """
    root = Path(directory)
    markers = sorted(root.glob(COMPLETE_MARKER.format(rank="*")))
    if not root.joinpath(TRAIN_STATE_FILE).is_file():
        return f"no {TRAIN_STATE_FILE}"
    if not markers:
        return None if legacy_ok else "no completion marker (an interrupted save)"
    try:
        manifests = {int(json.loads(m.read_text())["rank"]): json.loads(m.read_text()) for m in markers}
        world = int(next(iter(manifests.values()))["world_size"])
    except (ValueError, KeyError, TypeError) as exc:
        return f"unreadable completion marker: {exc}"
    absent = [r for r in range(world) if r not in manifests]
    if absent:
        return f"no completion marker from worker {absent[0]} (an interrupted save)"
    for marker_rank, manifest in sorted(manifests.items()):
        for name, (size, digest) in manifest["files"].items():
            path = root / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
            if marker_rank == rank % world and _sha256(path) != digest:
                return f"{name} differs from what was written"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_completion_marker(directory: str, rank: int, world_size: int, step: int) -> None:
    """List (size, SHA-256) every file this rank wrote into ``directory``; written last, fsynced."""
    root = Path(directory)
    marker = root / COMPLETE_MARKER.format(rank=rank)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if _MARKER_NAME.match(name):
            continue
        _fsync(path)
        files[name] = [path.stat().st_size, _sha256(path)]
    payload = json.dumps({"rank": rank, "world_size": world_size, "step": step, "files": files}, indent=1)
    temporary = marker.with_name(marker.name + ".tmp")
    with open(temporary, "w") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, marker)
    _fsync(root)


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _weights_only_loading(engine: Any) -> Iterator[None]:
    """Have DeepSpeed read checkpoint files with ``torch.load(weights_only=True)`` (tensors and plain data only).

    DeepSpeed's own loader unpickles with ``weights_only=False``, which runs whatever code
    a file names. The few DeepSpeed types its checkpoints hold are allowed explicitly.
    """
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    original = getattr(checkpoint_engine, "load", None)
    if original is None:
        yield
        return

    def load(path: str, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load
    try:
        yield
    finally:
        checkpoint_engine.load = original


def _deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def apply_optimizer_settings(scheduler: torch.optim.lr_scheduler.LambdaLR, train: TrainConfig) -> None:
    """Make the config's lr, schedule and weight decay win over a loaded checkpoint's.

    Loading restores the optimizer's param groups (lr, weight_decay) and the
    scheduler's ``base_lrs``, so a re-run with a lowered ``train.lr`` would otherwise
    keep the old rate. The schedule's position (``last_epoch``, the updates done) is
    kept; its multiplier comes from the config's warm-up, schedule and max_steps (the
    scheduler's lambda is built from the config and not restored).
    """
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [train.lr] * len(groups)
    multiplier = lr_multiplier(scheduler.last_epoch, train.warmup_steps, train.max_steps, train.lr_schedule)
    for group in groups:
        group["initial_lr"] = train.lr
        group["lr"] = train.lr * multiplier
        if "weight_decay" in group:
            group["weight_decay"] = train.weight_decay
    scheduler._last_lr = [group["lr"] for group in groups]


def save_checkpoint(
    engine: Any, causal_lm: Any, config: Config, state: TrainState, metrics: dict[str, Any], rank: int, final: bool,
    name_suffix: str = "", world_size: int = 1, checkpoint_root: Optional[str] = None,
) -> None:
    """DeepSpeed state of every rank + the step counter (+ the HF model at the end), via ray.train.report.

    Each rank lists what it wrote in its completion marker, last (:func:`write_completion_marker`):
    a save interrupted at any point leaves no checkpoint that :func:`checkpoint_problem`
    accepts. Ray Train registers the checkpoint (its run snapshot, which ``get_checkpoint``
    reads on a resume) only once every rank has reported it. A name already taken in
    ``checkpoint_root`` (an interrupted save, a damaged checkpoint skipped on resume) gets a
    ``-2``, ``-3``... suffix rather than mixing files into it.
    """
    import ray.train
    from ray.train import Checkpoint

    lora = config.train.lora.enabled
    name = _agreed_name(f"step_{state.step:07d}{name_suffix}", checkpoint_root, rank, world_size)
    with tempfile.TemporaryDirectory(prefix="lightreasoner-checkpoint-") as directory:
        reached("train.checkpoint_saving", step=state.step, rank=rank)
        # Frozen base weights never change under LoRA: keep them out of every checkpoint.
        engine.save_checkpoint(directory, tag=CHECKPOINT_TAG, exclude_frozen_parameters=lora)
        if final:
            save_hf_model(engine, causal_lm, config, str(Path(directory, MODEL_SUBDIR)), rank)
        if rank == 0:
            Path(directory, TRAIN_STATE_FILE).write_text(json.dumps(state.to_dict()))
        reached("train.checkpoint_written", step=state.step, rank=rank, directory=directory)
        write_completion_marker(directory, rank, world_size, state.step)
        reached("train.checkpoint_saved", step=state.step, rank=rank)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory), checkpoint_dir_name=name)


def _agreed_name(name: str, checkpoint_root: Optional[str], rank: int, world_size: int) -> str:
    """``name``, or the first free ``name-<n>`` under ``checkpoint_root``, as rank 0 decides it."""
    if checkpoint_root is None:
        return name
    chosen = [name]
    if rank == 0:
        candidate, n = name, 1
        while storage.exists(join_path(checkpoint_root, candidate)):
            n += 1
            candidate = f"{name}-{n}"
        chosen = [candidate]
    if world_size > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def save_hf_model(engine: Any, causal_lm: Any, config: Config, directory: str, rank: int) -> None:
    """Rank 0 writes the PEFT adapter (LoRA) or the HF model (full), with the tokenizer.

    Under ZeRO-3 the weights are partitioned and every rank joins the gathering: of the
    adapter's parameters alone under LoRA (the frozen base is never gathered), or of one
    parameter at a time for a full model, which rank 0 streams into safetensors shards
    (zero3_weights.py). No rank ever holds the whole model.
    """
    lora = config.train.lora.enabled
    state_dict = None
    if config.train.deepspeed.stage == 3:
        if lora:
            state_dict = adapter_state_dict(causal_lm, rank)
        else:
            save_model_shards(causal_lm, directory, rank)
            if rank == 0:
                load_tokenizer(config.expert, "expert").save_pretrained(directory)
            return
    if rank != 0:
        return
    causal_lm.save_pretrained(directory, state_dict=state_dict)
    load_tokenizer(config.expert, "expert").save_pretrained(directory)


def checkpoint_step(checkpoint: Any) -> int:
    """The update a Ray Train checkpoint was taken at."""
    with checkpoint.as_directory() as directory:
        return int(json.loads(Path(directory, TRAIN_STATE_FILE).read_text())["step"])

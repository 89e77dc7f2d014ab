"""Moving weights in and out of a ZeRO-3 model without any rank holding it whole.

Under ZeRO-3 every parameter is a placeholder whose ``ds_tensor`` holds this rank's
contiguous slice of the flattened weight: elements ``[r * n, (r + 1) * n)`` where ``r`` is
the rank in ``param.ds_process_group`` and ``n = ds_tensor.ds_numel`` (the weight padded
to a multiple of the group size, divided by it; the last slice's padding stays zero). So:

- loading (:func:`load_partitions`) reads, for every parameter, only the rows of the
  safetensors tensor that cover this rank's slice (memory-mapped, ``get_slice``) and copies
  them into ``ds_tensor``: nothing is gathered, nothing beyond the partition plus two rows
  is materialised (transformers' own ZeRO-3 loading reads every tensor whole on every rank);
- saving a LoRA adapter (:func:`adapter_state_dict`) gathers the trainable parameters only;
- saving a fully fine-tuned model (:func:`save_model_shards`) gathers one parameter at a
  time and rank 0 streams it straight into its safetensors shard (the header is written
  first, from the shapes, which every rank knows), so no rank ever holds more than its
  partitions plus one gathered parameter.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 1 << 30


def weight_files(model_dir: str) -> Optional[list[str]]:
    """The model's safetensors files (None when it has none, e.g. a ``pytorch_model.bin`` checkpoint)."""
    directory = Path(model_dir)
    index = directory / SAFE_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [str(directory / name) for name in sorted(set(weight_map.values()))]
    single = directory / SAFE_WEIGHTS
    return [str(single)] if single.is_file() else None


def _checkpoint_key(name: str, keys: set[str], prefix: str) -> Optional[str]:
    for candidate in (name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None,
                      f"{prefix}.{name}" if prefix else None):
        if candidate and candidate in keys:
            return candidate
    return None


def coverage(model: Any, files: list[str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """For each distinct parameter (by first name) and persistent buffer: (file, key) where it is stored;
    and what cannot be loaded slice by slice (a name not found, or a shape that differs from the model's)."""
    from safetensors import safe_open

    located: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                located[key] = path
                shapes[key] = list(handle.get_slice(key).get_shape())
    keys = set(located)
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: dict[str, tuple[str, str]] = {}
    problems = []
    by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    first_names = {id(p): n for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    for pid, names in by_param.items():
        name = first_names[pid]
        key = next((k for k in (_checkpoint_key(n, keys, prefix) for n in names) if k), None)
        if key is None:
            problems.append(f"{name} not found")
        elif shapes[key] != _full_shape(params[name]):
            problems.append(f"{key} has shape {shapes[key]}, the model's {name} {_full_shape(params[name])}")
        else:
            found[name] = (located[key], key)
    for name, buffer in _persistent_buffers(model):
        key = _checkpoint_key(name, keys, prefix)
        if key is not None and shapes[key] == list(buffer.shape):
            found[name] = (located[key], key)
    return found, problems


def _persistent_buffers(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer


def _partition_rank(param: Any) -> int:
    import deepspeed.comm as dist

    return dist.get_rank(group=param.ds_process_group)


def load_partitions(model: Any, found: dict[str, tuple[str, str]]) -> int:
    """Copy this rank's slice of every parameter (and every persistent buffer) from the files; elements copied.

    The largest tensor this materialises is one partition plus at most two rows of the weight
    (the rows its first and last elements fall in). Nothing is gathered.
    """
    from safetensors import safe_open

    params = dict(model.named_parameters())
    buffers = dict(_persistent_buffers(model))
    by_file: dict[str, list[tuple[str, str]]] = {}
    for name, (path, key) in found.items():
        by_file.setdefault(path, []).append((name, key))
    copied = 0
    with torch.no_grad():
        for path, entries in by_file.items():
            with safe_open(path, framework="pt") as handle:
                for name, key in entries:
                    if name in buffers:
                        buffers[name].copy_(handle.get_tensor(key))
                        continue
                    copied += _load_partition(params[name], handle, key, name)
    return copied


def _load_partition(param: Any, handle: Any, key: str, name: str) -> int:
    source = handle.get_slice(key)
    shape = list(source.get_shape())
    numel = math.prod(shape)
    if numel != param.ds_numel:  # coverage() refuses these first
        raise ValueError(f"{name}: the checkpoint holds shape {shape}, the model {tuple(param.ds_shape)}")
    partition = param.ds_tensor
    # The partition DeepSpeed really uses: ds_tensor.ds_numel elements (the padded weight over the
    # group's size) at this rank's position in the parameter's own process group.
    size = partition.ds_numel if hasattr(partition, "ds_numel") else partition.numel()
    start = size * _partition_rank(param)
    end = min(start + size, numel)
    if start >= numel:
        partition.zero_()
        return 0
    if not shape:
        flat = handle.get_tensor(key).reshape(-1)
    elif len(shape) == 1:
        flat = source[start:end]
    else:
        row = numel // shape[0]
        first, last = start // row, -(-end // row)
        flat = source[first:last].reshape(-1)[start - first * row:end - first * row]
    partition.narrow(0, 0, end - start).copy_(flat)
    if end - start < partition.numel():
        partition.narrow(0, end - start, partition.numel() - (end - start)).zero_()  # the padding
    return end - start


def adapter_state_dict(causal_lm: Any, rank: int) -> Optional[dict[str, torch.Tensor]]:
    """The trainable parameters, gathered (all ranks must call this); the dict on rank 0, None elsewhere.

    Frozen base weights are never gathered.
    """
    import deepspeed

    named = [(name, param) for name, param in causal_lm.named_parameters() if param.requires_grad]
    state: Optional[dict[str, torch.Tensor]] = {} if rank == 0 else None
    with deepspeed.zero.GatheredParameters([param for _, param in named], modifier_rank=None):
        if state is not None:
            for name, param in named:
                state[name] = param.detach().cpu().clone()
    return state


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _full_shape(tensor: Any) -> list[int]:
    return list(tensor.ds_shape) if hasattr(tensor, "ds_shape") else list(tensor.shape)


def _nbytes(tensor: Any) -> int:
    return math.prod(_full_shape(tensor)) * tensor.element_size()


def _shard_plan(named: list[tuple[str, Any]], max_shard_bytes: int) -> list[list[tuple[str, Any]]]:
    """Consecutive groups of at most ``max_shard_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[tuple[str, Any]]] = []
    size = 0
    for name, tensor in named:
        nbytes = _nbytes(tensor)
        if not shards or (size + nbytes > max_shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append((name, tensor))
        size += nbytes
    return shards


def _safetensors_header(entries: list[tuple[str, Any]]) -> bytes:
    """The header of a safetensors file holding ``entries`` in this order (data offsets from the shapes)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in entries:
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: cannot write dtype {tensor.dtype} to safetensors")
        nbytes = _nbytes(tensor)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": _full_shape(tensor),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    return len(encoded).to_bytes(8, "little") + encoded


def _write_tensor(handle: Any, tensor: torch.Tensor) -> None:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        handle.write(memoryview(flat.view(torch.uint8).numpy()))


def save_model_shards(causal_lm: Any, directory: str, rank: int, max_shard_bytes: int = MAX_SHARD_BYTES,
                      on_gathered: Optional[Callable[[str, Any], None]] = None) -> None:
    """Write a ZeRO-3 model as a Hugging Face model (safetensors shards + config), gathering one parameter at a time.

    All ranks must call this (every gather is collective); rank 0 writes. Each shard's
    header is written first, from the parameters' full shapes, then every parameter is
    gathered, its bytes appended and the gathered copy released before the next one:
    no rank holds more than its own partitions plus one gathered parameter. Tied
    parameters are written once, under their first name (as ``save_pretrained`` does).
    ``on_gathered(name, param)`` is called on every rank while a parameter is gathered
    (for tests).
    """
    named: list[tuple[str, Any]] = list(causal_lm.named_parameters())
    named += [(name, buffer) for name, buffer in _persistent_buffers(causal_lm)]
    shards = _shard_plan(named, max_shard_bytes)
    names = [SAFE_WEIGHTS] if len(shards) == 1 else [
        f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors" for index in range(len(shards))
    ]
    if rank == 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for shard, file_name in zip(shards, names):
        handle = open(os.path.join(directory, file_name), "wb") if rank == 0 else None
        try:
            if handle is not None:
                handle.write(_safetensors_header(shard))
            for name, tensor in shard:
                if hasattr(tensor, "ds_id"):
                    import deepspeed

                    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                        if on_gathered is not None:
                            on_gathered(name, tensor)
                        if handle is not None:
                            _write_tensor(handle, tensor.data)
                elif handle is not None:
                    _write_tensor(handle, tensor)
                weight_map[name] = file_name
        finally:
            if handle is not None:
                handle.close()
    if rank != 0:
        return
    if len(shards) > 1:
        total = sum(_nbytes(tensor) for _, tensor in named)
        Path(directory, SAFE_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    config = causal_lm.config
    config.architectures = [type(causal_lm).__name__]
    first = next(iter(causal_lm.parameters()), None)
    if first is not None:
        config.dtype = first.dtype
    config.save_pretrained(directory)
    generation = getattr(causal_lm, "generation_config", None)
    if generation is not None and getattr(causal_lm, "can_generate", lambda: False)():
        generation.save_pretrained(directory)

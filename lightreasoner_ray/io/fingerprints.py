"""Fingerprints: short hashes that identify weights, samples and settings, so a stage record
(:mod:`lightreasoner_ray.io.record`) can tell whether its inputs changed.

Fingerprinting weights has to be cheap enough to run on every evaluation of a
15 GB model, so :func:`weights_fingerprint` reads every file's name and size, hashes
the whole content of small files (configs, tokenizers, LoRA adapters,
``provenance.json``), and of large files only the safetensors header (tensor names,
shapes, dtypes and offsets) and the modification time. A re-written checkpoint gets
a new mtime, and a trained model directory carries its ``provenance.json``, so
either changes the fingerprint; what it cannot see is a large file overwritten in
place with the same layout and a forged mtime. A PEFT adapter's fingerprint covers
its base model's too. A model that is not a local directory (a hub id) is
identified by its name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from lightreasoner_ray.io import storage
from lightreasoner_ray.io.model_dirs import adapter_base_path

# Files up to this size are hashed whole; larger ones by their layout and mtime.
FULL_HASH_MAX_BYTES = 64 << 20
_READ_CHUNK = 1 << 20
_SAFETENSORS_MAX_HEADER = 100 << 20


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(_READ_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets)."""
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return b""
        length = int.from_bytes(prefix, "little")
        if length > _SAFETENSORS_MAX_HEADER:
            return b""
        return handle.read(length)


def _model_files(directory: Path) -> list[Path]:
    """Every file under ``directory`` except hidden ones (caches, temporaries)."""
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(Path(root, name) for name in sorted(names) if not name.startswith("."))
    return files


def weights_fingerprint(path: str, full_hash_max_bytes: int = FULL_HASH_MAX_BYTES, _seen: frozenset = frozenset()) -> str:
    """A short hash identifying the weights (and adapter) at ``path``; see the module docstring."""
    local = Path(path).expanduser()
    if storage.is_uri(path) or not local.exists():
        return "name-" + hashlib.sha256(path.encode("utf-8")).hexdigest()[:16]
    digest = hashlib.sha256(b"weights-v1\0")
    files = [local] if local.is_file() else _model_files(local)
    for file in files:
        stat = file.stat()
        relative = file.name if file == local else file.relative_to(local).as_posix()
        digest.update(f"{relative}\0{stat.st_size}\0".encode("utf-8"))
        if stat.st_size <= full_hash_max_bytes:
            digest.update(_file_digest(file).encode("ascii"))
        else:
            if file.suffix == ".safetensors":
                digest.update(safetensors_header(file))
            digest.update(str(stat.st_mtime_ns).encode("ascii"))
    if local.is_dir():
        base = adapter_base_path(str(local))
        resolved = str(local.resolve())
        if base and resolved not in _seen:
            digest.update(b"base\0" + weights_fingerprint(base, full_hash_max_bytes, _seen | {resolved}).encode())
    return digest.hexdigest()[:16]


def samples_fingerprint(files: Iterable[str]) -> str:
    """A hash of the samples' content: the sorted digests of their files (their names are random)."""
    digests = sorted(hashlib.sha256(storage.read_bytes(path)).hexdigest() for path in files)
    return hashlib.sha256("\n".join(digests).encode("ascii")).hexdigest()[:16]


def settings_fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def text_fingerprint(*parts: Any) -> str:
    """A short hash of JSON-able ``parts`` (a problem's prompt, a benchmark row's question and answer)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def problem_fingerprints(problems: Iterable[dict[str, Any]]) -> dict[str, str]:
    """``{problem_id: hash of its prompt token ids}``: the question as the models see it."""
    return {str(problem["problem_id"]): text_fingerprint(list(problem["prompt_ids"])) for problem in problems}


def rows_fingerprint(rows: Iterable[dict[str, Any]], fields: tuple[str, ...] = ("id", "question", "answer")) -> str:
    """One hash of benchmark rows' ids, questions and gold answers (in order)."""
    return text_fingerprint([[row.get(field) for field in fields] for row in rows])


def resolved_dtype_name(requested: str, gpus: float) -> str:
    """The dtype a model configured with ``requested`` runs in, as far as the driver can tell:
    ``auto`` is float32 on CPU (``gpus`` = 0), and on a GPU bfloat16 where the GPU has it, else
    float16 (named ``auto-gpu`` when the driver sees no GPU to ask)."""
    if requested != "auto":
        return requested
    if gpus <= 0:
        return "float32"
    try:
        import torch

        if torch.cuda.is_available():
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    except Exception:  # no torch, or a GPU that cannot be asked: say what is known
        pass
    return "auto-gpu"

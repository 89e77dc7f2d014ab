"""Reading an offline W&B run back from its ``run-<id>.wandb`` file, for the tests.

The file is W&B's transaction log: a 7-byte header (``:W&B``, magic, version), then
LevelDB-log framed records (32 KiB blocks; each chunk has a CRC, a length and a type:
full, first, middle, last), each a ``wandb.proto.wandb_internal_pb2.Record``. ``wandb
sync`` replays exactly these records to a server.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK_BYTES = 32768
CHUNK_HEADER_BYTES = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    records, pending, offset = [], b"", 7
    while offset + CHUNK_HEADER_BYTES <= len(data):
        left_in_block = BLOCK_BYTES - offset % BLOCK_BYTES
        if left_in_block < CHUNK_HEADER_BYTES:
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset:offset + CHUNK_HEADER_BYTES])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            offset += left_in_block
            continue
        chunk = data[offset + CHUNK_HEADER_BYTES:offset + CHUNK_HEADER_BYTES + length]
        offset += CHUNK_HEADER_BYTES + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """The run's name, group and job type, history rows, summary, config and saved files."""
    (log,) = Path(run_dir).glob("run-*.wandb")
    run: dict[str, Any] = {"history": [], "summary": {}, "config": {}, "files": []}
    for record in read_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, group=record.run.run_group, job_type=record.run.job_type)
            run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            run["history"].append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            run["summary"].update({_key(item): json.loads(item.value_json) for item in record.summary.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "files":
            run["files"].extend(file.path for file in record.files.files)
    return run

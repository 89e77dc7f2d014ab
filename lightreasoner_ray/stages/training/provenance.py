"""What a training run's checkpoints and published model were made from, and which
``train.*`` settings may change between the runs of one output_dir."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lightreasoner_ray.config import TrainConfig, flatten_tree
from lightreasoner_ray.io.record import added_at_default

# train.* keys that may differ between the runs of one output_dir, and why:
# - the step budget and bookkeeping: raising max_steps continues the same run;
# - where the samples are (their content is fingerprinted instead) and resources that do
#   not change the numbers (cpus_per_worker; gradient_checkpointing recomputes the same
#   activations);
# - optimizer settings, which the config sets anew on resume (training.checkpoints.restore_checkpoint), so a
#   lowered lr takes effect from the next update; the metrics log records the lr used.
# Everything else (data order: seed, micro_batch_steps, grad_accum, num_workers,
# steps_per_update; the model: lora.*, deepspeed.*, the device via gpus_per_worker) shapes
# what a checkpoint holds or where its data position points: a change is refused.
# A new train.* key is refused when it changes unless it is listed here.
RESUMABLE_TRAIN_KEYS = frozenset({
    "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "max_failures",
    "samples", "cpus_per_worker", "gradient_checkpointing",
    "lr", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm",
})


def shaping_train_settings(config: Any) -> dict[str, Any]:
    """The ``train.*`` settings (and ``expert.dtype``) a checkpoint's content depends on."""
    settings = {
        key: value for key, value in flatten_tree(dataclasses.asdict(config.train), "train").items()
        if key.split(".", 1)[1] not in RESUMABLE_TRAIN_KEYS
    }
    if config.train.divergence != "jsd":
        settings.pop("train.jsd_beta", None)  # read by the jsd loss alone
    settings["expert.dtype"] = config.expert.dtype
    return settings


@dataclass
class TrainingProvenance:
    """What a training run's checkpoints and published model were made from."""

    samples: str  # samples_fingerprint of the training samples
    expert: str  # weights_fingerprint of the expert
    settings: dict[str, Any] = field(default_factory=dict)  # shaping_train_settings
    samples_source: str = ""  # where the samples were (informational)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "samples_source": self.samples_source, "expert": self.expert,
                "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> "TrainingProvenance":
        return cls(samples=str(record.get("samples", "")), expert=str(record.get("expert", "")),
                   settings=dict(record.get("settings") or {}), samples_source=str(record.get("samples_source", "")))

    def changes_from(self, recorded: "TrainingProvenance") -> list[str]:
        """What differs now from ``recorded``, one phrase each (empty when nothing does)."""
        changes = []
        if recorded.samples != self.samples:
            where = f" in {self.samples_source}" if self.samples_source else ""
            changes.append(f"the samples changed{where} (content fingerprint {recorded.samples} -> {self.samples}; "
                           "re-sampled, or other problems or sampling settings?)")
        if recorded.expert != self.expert:
            changes.append(f"the expert's weights changed (fingerprint {recorded.expert} -> {self.expert})")
        defaults = flatten_tree(dataclasses.asdict(TrainConfig()), "train")
        for key in sorted(set(recorded.settings) | set(self.settings)):
            if added_at_default(key, recorded.settings, self.settings.get(key), defaults):
                continue
            if key not in self.settings:
                # Left out now, so it does not shape this run's checkpoints (jsd_beta without jsd;
                # a key an older version recorded that is resumable now).
                continue
            before, after = recorded.settings.get(key, "<unset>"), self.settings.get(key, "<unset>")
            if before != after:
                changes.append(f"{key}: {before!r} -> {after!r}")
        return changes

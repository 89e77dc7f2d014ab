"""The training stage: the Ray Train driver, the DeepSpeed worker loop, its checkpoints, metrics log and configuration."""

"""The training stage: the Ray Train driver, the DeepSpeed worker loop and its configuration."""

"""The sampling stage: the contrastive sampler (one pair on one device) and its Ray Data stage."""

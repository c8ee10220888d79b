"""Region-level augmentations (PRC, PRM, RBJ) and the de-positioning composite, on batches."""

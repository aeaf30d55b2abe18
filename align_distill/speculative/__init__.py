"""Draft models for speculative decoding: acceptance rates, block efficiency and a reference speculative sampler."""

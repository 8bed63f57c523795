"""Training: data (synthetic tasks, corpora, packing, SFT batches), the trainer, checkpoints, GRPO."""

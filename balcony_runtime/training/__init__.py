"""Self-distillation training of balconies (DESIGN §1): data, dense forward, KL loss, loop, checkpoints."""

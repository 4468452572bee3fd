"""The tuner: datasets, losses, checkpoints, callbacks and the frozen-prefix cache that a fine-tune
is made of, and levers.py, the one seam to the CPU fast path (accel/)."""

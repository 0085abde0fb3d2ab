"""Training loops (one file per algorithm family), advantages, engine setup, checkpoints, logging."""

"""What runs in each training worker: the phase as a recipe, the step engine, losses, step checkpoints."""

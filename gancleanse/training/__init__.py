"""Pure training step, optimizers, schedule, recording and replay."""

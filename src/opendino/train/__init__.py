"""Training: schedules, parameter groups and (with the SSL recipe) the loop, checkpoints and parallelism."""

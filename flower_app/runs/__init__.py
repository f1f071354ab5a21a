"""What a run needs and leaves: device and splits, the schedule, hooks, checkpoints, results."""

"""Training: the loop, one step, the run's state, optimizer, precision, ranks, logging."""

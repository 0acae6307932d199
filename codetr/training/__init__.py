"""Training: the loop and its hooks, stop signals, optimizer and schedule, mixed precision, EMA, the run folder."""

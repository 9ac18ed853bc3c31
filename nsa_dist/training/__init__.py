"""One rank's training: the loop, the optimizer engine, checkpoints, the loss, metrics and logs, the process group."""

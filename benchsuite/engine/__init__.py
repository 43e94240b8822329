"""Job grid, training loop, evaluation and the runner that ties them to result files."""

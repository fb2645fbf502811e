"""Pure verdicts and stored baselines: tensors and figures in, a verdict out. Runs no model; imports only common."""

"""Training: setup, the explicit loop and step, the optimizer, checkpoints and resume, the best adapter and the
run's finish, CUDA graphs, the run log and its plots. Imports inference, budget, modeling and the floors
below."""

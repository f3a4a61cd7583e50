"""budgetune search: the Optuna study (storage, workers, pruning), its search space drawn from the budget
planner, and the leaderboard, plots and best.yaml it writes."""

"""The trainable-parameter budget: exact counts of a configuration (on the meta device, no weights) and of a live
model, the budget gate, and the planner that lists what fits. Imports modeling and the floors below it.

count: Breakdown, count_trainable, config_breakdown (meta device), check_live and the over-budget message.
plan: what fits a budget (plan), rank auto, check_budget with its suggestions, the `params` and `plan` commands.
plan imports count, never the reverse."""

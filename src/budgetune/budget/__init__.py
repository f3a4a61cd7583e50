"""The trainable-parameter budget: exact counts of a configuration (on the meta device, no weights) and of a live
model, the budget gate, and the planner that lists what fits. Imports modeling and the floors below it."""

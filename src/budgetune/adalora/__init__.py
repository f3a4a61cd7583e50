"""AdaLoRA around peft's allocator: the three-phase schedule (warm-up, pruning, final rank pattern), the masks
that make a validation score what is saved, and the lean training step. Imports the floors below it (config,
errors, hardware, data) only."""

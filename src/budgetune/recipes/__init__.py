"""Recipes built on training: distillation from teachers, self-training on unlabelled text, and the Optuna
search. Imports training, inference and the floors below."""

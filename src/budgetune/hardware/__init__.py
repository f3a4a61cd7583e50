"""Devices and precision: accelerate's Accelerator made once per run, mixed precision, how frozen weights are
stored. Imports nothing of budgetune but errors and config."""

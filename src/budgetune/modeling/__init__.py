"""Models: base models for every architecture (Hub or local or packaged), classification heads, peft adapter
configs for each method, the adapter scale, and the fast inference forward. Imports adalora and the floors
below."""

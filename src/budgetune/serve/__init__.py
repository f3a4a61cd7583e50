"""budgetune serve: the FastAPI app, the registry of adapters on shared base models, the micro-batching queue and
the Prometheus counters. Imports inference and the floors below."""

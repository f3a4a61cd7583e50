"""budgetune."""

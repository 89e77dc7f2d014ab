"""Storage (atomic, local or URI), the run layout and the stage record."""

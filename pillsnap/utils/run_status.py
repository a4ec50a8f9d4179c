"""The statuses a run's reports/metrics.json gives its training, grouped as the trainer that writes them and the
evaluation that reads them both mean them."""

COMPLETED_STATUSES = ("completed", "early_stopped")  # trained all it meant to
FINISHED_STATUSES = (*COMPLETED_STATUSES, "time_capped")  # ended on its own (not cut short)

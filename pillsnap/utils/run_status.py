"""The statuses a run's reports/metrics.json gives its training, grouped as the trainer that writes them and the
evaluation that reads them both mean them."""

COMPLETED_STATUSES = ("completed", "early_stopped")  # trained all it meant to
FINISHED_STATUSES = (*COMPLETED_STATUSES, "time_capped")  # ended on its own (not cut short)


def is_fresh_start(record: dict) -> bool:
    """Whether a metrics.jsonl record is the start of a new run (not a resume, nor a torchrun restart of the same
    job, even one before its first checkpoint): a new run appends to the file its folder's earlier runs wrote, so
    what came before it is not this run's."""
    return (record.get("type") == "start" and not int(record.get("start_epoch") or 0) and not record.get("resumed_at")
            and not int(record.get("restart") or 0))  # a torchrun restart goes on with its job, checkpoints or not

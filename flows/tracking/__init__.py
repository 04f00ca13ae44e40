"""Everything MLflow: the stage run helper, killed-run recovery, reports, the served model, promote, compare,
sweeps; and what a run shows in Prefect (runlog: names and progress lines)."""

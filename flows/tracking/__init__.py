"""Everything MLflow: the stage run helper, killed-run recovery, reports, the served model, promote, compare."""

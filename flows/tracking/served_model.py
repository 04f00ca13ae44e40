"""MLflow "models from code" entry for a stage-1 projector: MLflow copies this file into the model and imports it
on load (no pickle). The class lives in flows/tracking/served.py; this file only names it."""

import mlflow

from flows.tracking.served import ProjectorModel

mlflow.models.set_model(ProjectorModel())

"""latfarm server: REST API, database, dataset import and predictor hosting."""

__version__ = "0.1.0"

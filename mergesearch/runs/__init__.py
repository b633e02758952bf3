"""A run's results: the store (typed trial records over Optuna's storage), the export and the report."""

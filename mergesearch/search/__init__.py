"""The search side: samplers, the ask/tell controller, soups. Only this and space.py know Optuna."""

"""The model registry on MLflow (the only package that imports mlflow) and the promotion policy."""

"""MLflow tracking: run layout, registry, lineage, promotion, comparisons."""

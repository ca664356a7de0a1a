"""Everything that runs things: config, CLI, Ray Train/Tune, MLflow tracking, benchmarks."""

"""One Ray Train run: the driver side (``driver``: TorchTrainer, fit, best checkpoint, plots), the worker
function (``worker``), the optimisation step (``step``), evaluation during training (``evaluation``)
and the pictures logged to MLflow (``plots``)."""

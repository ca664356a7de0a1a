"""One training run: the driver side (``driver``: TorchTrainer, fit, best checkpoint, plots), the worker
(``worker``: the Trainer, in a Ray Train group or without Ray), where a worker runs (``session``), its
checkpoints (``checkpointer``), the optimisation step (``step``), evaluation (``evaluation``), Ray Train's
failure policy and Ctrl-C (``fault_tolerance``), the console, and the pictures logged to MLflow."""

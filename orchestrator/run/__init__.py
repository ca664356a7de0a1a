"""The life of ONE run: its name and directory, preflight, its MLflow run, its checkpoint files.

- ``directory``: naming and claiming ``<storage_path>/<name>``, ``sdo_run.json`` (the only writer).
- ``preflight``: every check that needs no Ray, and the resolved (absolute-path) config.
- ``tracking``: MLflow stores, creating / resuming / finishing a run, the rank-0 and driver logger.
- ``lifecycle``: open a run (directory + MLflow run) and read its identity back.
- ``checkpoints``: training checkpoint files.
"""

"""The life of ONE run, with no Ray in it: its name, directory and identity, preflight, MLflow, checkpoint files.

- ``directory``: naming ``<storage_path>/<name>``, the stop and crash markers, atomic JSON writes.
- ``identity``: RunIdentity (name, directory, storage, MLflow ids) and ``sdo_run.json`` (its only writer).
- ``preflight``: every check that needs no Ray, and the resolved (absolute-path) config.
- ``lifecycle``: open a run or a sweep's parent run (directory + MLflow run), or find it again.
- ``tracking``: MLflow stores, creating / finishing runs, the RunLogger, the UI's URLs.
- ``checkpoints``: the file format of a training checkpoint (the policy: orchestrator.train.checkpointer).
- ``weights``: weights a user names (file, folder, runs:/, models:/); ``mlflow_model``: the logged model.
- ``storage``: local folders and object storage behind one interface; ``errors``: what fails how.
"""

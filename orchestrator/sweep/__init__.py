"""`sdo sweep`: the Tune driver and where a sweep runs (``tuner``), one trial (``trial``), the search space and
search algorithm (``space``), what it optimises (``objectives``), ASHA and MO-ASHA (``schedulers``), the MLflow
parent and child runs and the models of the trials kept (``runs``), trials as rows with their cost (``rows``),
the report (``report``), Pareto fronts, ranks and hypervolume (``pareto``), and `sdo bench sweep` (``benchmark``).

``python -m orchestrator.sweep`` is a sweep's Ray Job entry point (``__main__``).
"""

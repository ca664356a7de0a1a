"""`sdo sweep`: the Tune driver and where a sweep runs (``tuner``), one trial (``trial``), the search space and
search algorithm (``space``), the ASHA scheduler (``schedulers``), the MLflow parent and child runs (``runs``),
trials as rows with their GFLOPs (``rows``), the report (``report``) and the Pareto front (``pareto``).

``python -m orchestrator.sweep`` is a sweep's Ray Job entry point (``__main__``).
"""

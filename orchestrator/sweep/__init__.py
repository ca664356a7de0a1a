"""`sdo sweep`: the Ray Tune driver (``driver``), the search space (``space``), the trial table and
report (``report``) and the Pareto front of AP vs GFLOPs (``pareto``).

``python -m orchestrator.sweep`` is a sweep's Ray Job entry point (``__main__``).
"""

"""Where a run executes: embedded Ray (``local``), the Ray Jobs API (``jobs``), KubeRay (``kuberay/``);
``dispatch`` picks one from ``--cluster``. The only place that talks to Kubernetes."""

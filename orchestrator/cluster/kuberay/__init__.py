"""`--cluster k8s.yaml`: the cluster spec, the rendered manifests and their schemas, the Kubernetes client,
following a RayJob, and submitting one (rayjob.py) which ties them together."""

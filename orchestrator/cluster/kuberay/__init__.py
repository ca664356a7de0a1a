"""`--cluster k8s.yaml`: the cluster spec, the rendered manifests and their schemas, the Kubernetes client,
following a RayJob, and the launcher that ties them together."""

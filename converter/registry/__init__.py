"""Client for the OCI distribution API (pull and push of manifests and blobs)."""

"""A simulated Kubernetes API server, faithful enough for the real kubectl: the upstream for the
gateway's demo and end-to-end tests. Run it with `python -m devcluster --dir DIR`, or
from Python with `start_devcluster(DIR)`."""
from .process import DevCluster, DevClusterError, start_devcluster

__all__ = ["DevCluster", "DevClusterError", "start_devcluster"]

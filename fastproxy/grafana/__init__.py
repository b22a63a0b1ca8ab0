"""`/grafana/$CLUSTER/`: each cluster's Grafana behind the gateway, signed in by Grafana's auth proxy."""

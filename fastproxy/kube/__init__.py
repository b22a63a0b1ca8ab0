"""Kubernetes API conventions the gateway's own API and the simulated cluster both follow:
PATCH bodies and label/field selectors. Refusals are StatusErrors (400, 415, 422)."""

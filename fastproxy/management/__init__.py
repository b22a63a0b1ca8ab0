"""The management API (management.loft.sh/v1) served in process under /kubernetes/management/."""

"""Load-test harness for fastproxy against kubectl proxy, nginx and a direct upstream (run `scripts/bench`)."""

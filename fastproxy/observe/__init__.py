"""Request observers: what the gateway counts and records about the requests it serves."""

"""Tests of the request observers."""

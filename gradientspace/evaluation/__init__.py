"""Scoring strategies on the test split, and the report of a run."""

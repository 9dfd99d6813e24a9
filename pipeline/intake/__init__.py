"""Intake: the drop protocol, ingest, validation and insurer profiles."""

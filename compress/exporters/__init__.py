"""Exporters: the student as a file a production runtime loads."""

"""Shared, torch-free pieces of tpqueue: schemas, errors, settings, Redis keys."""

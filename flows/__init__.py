"""Prefect flow definitions of stablenew_core (orchestration only; the work is in the domain)."""

from .pipeline import pipeline

__all__ = ["pipeline"]

"""The connection's own failures (not Vault's: those are in clinical_crm.vault.errors).

Kept free of heavy imports so the DAG factory can name them in its retry policy at parse time.
"""
from __future__ import annotations


class ConfigError(Exception):
    """A connection configuration file is invalid (names the file, the key and the problem)."""


class QualityThresholdExceeded(Exception):
    """Too large a share of rows failed the checks: the run loads nothing (not retried)."""

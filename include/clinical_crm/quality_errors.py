"""The data quality failure, apart from quality.py so the DAG files can name it without importing
pandas or Great Expectations at parse time."""


class QualityThresholdExceeded(Exception):
    """Too large a share of rows failed the checks: the run loads nothing (not retried)."""

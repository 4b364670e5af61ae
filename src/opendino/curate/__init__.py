"""Data curation: embed a pool, remove duplicates, cluster it hierarchically, sample it in a balanced way,
retrieve around seed sets and mix sources (``opendino curate``; docs/curation.md)."""

from opendino.curate.pipeline import CurateConfig, run_curation

__all__ = ["CurateConfig", "run_curation"]

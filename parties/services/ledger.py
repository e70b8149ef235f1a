"""Transitional: the old import path of appending to the log, for the capabilities not yet
moved. The integrator points them at `parties.ledger.client` and deletes this module."""

from parties.ledger.client import append_entry as record_event
from parties.ledger.client import signed_entry as signed_event

__all__ = ["record_event", "signed_event"]

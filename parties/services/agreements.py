"""Transitional: the old import path of the serving node's consent registry and contract book,
for the capabilities not yet moved. The integrator points them at `parties.agreements.books`
and deletes this module."""

from parties.agreements.books import consent_registry, contract_book

__all__ = ["consent_registry", "contract_book"]

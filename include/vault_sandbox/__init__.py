"""A local Vault REST API server that plays the CTMS vault or the Medical CRM vault.

Start it with ``python -m vault_sandbox serve ...``; see docs/sandbox.md. The product never
imports this package: the two meet only over HTTP.
"""

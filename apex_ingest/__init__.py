"""Apex Ingest: the event-ingestion service of Apex.

Kept free of imports on purpose: `apex_ingest.v1` (the generated stubs) and
`apex_ingest.common` are imported by the gateway, which must not pay for the server's
dependencies.
"""

__version__ = "0.1.0"

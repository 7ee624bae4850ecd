"""Generated protobuf stubs for apex_ingest.v1 (see `make proto`)."""

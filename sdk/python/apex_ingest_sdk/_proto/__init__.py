"""Generated protobuf messages of ``proto/apex_ingest/v1/ingest.proto`` (``make proto``).

The same descriptor file as the server's ``apex_ingest.v1.ingest_pb2``, byte for byte, so both
modules can be imported in one process; the SDK never imports the server package.
"""

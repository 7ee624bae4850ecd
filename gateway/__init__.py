"""Apex Ingest's JSON gateway: the public POST /api/events in front of the gRPC server.

It talks to the server only through the generated stubs in apex_ingest.v1. The app is built by
`gateway.app.create_app`; this package itself imports nothing, so `apex-ingest serve`'s
supervisor (which only runs granian, gateway/serve.py) does not import Flask and the app's
modules: each granian worker imports them for itself.
"""

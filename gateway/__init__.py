"""Apex Ingest's JSON gateway: the public POST /api/events in front of the gRPC server.

It talks to the server only through the generated stubs in apex_ingest.v1. The app is built by
`gateway.app.create_app` (`gateway.wsgi:app` for WSGI servers); gateway/serve.py runs it
under granian.
"""

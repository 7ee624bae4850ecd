"""Pieces shared by the gRPC server, the gateway and the operations commands.

No Flask and no SQLAlchemy here (import-linter checks it): the gateway imports this package.
"""

"""The gRPC server: validation, storage (SQLAlchemy), projects, health, admission."""

"""Operations: the apex-ingest command, process supervision, migrations, partitions."""

from apex_ingest.ops.cli import main

main()

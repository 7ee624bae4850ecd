from apex_ingest.cli import main

main()

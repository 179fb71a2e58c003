from autoresearch_cli.cli import main

main()

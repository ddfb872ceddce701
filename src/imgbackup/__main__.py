from imgbackup.cli.main import run

run()

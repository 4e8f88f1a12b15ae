from semsr.cli import run

run()

from hpcattn.cli import main

main(prog_name="hpcattn")

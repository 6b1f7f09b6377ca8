"""``python -m hpcattn.bench PART JSON``: one measuring part in this process (see ``worker``)."""
import sys

from .worker import main

main(sys.argv[1], sys.argv[2])

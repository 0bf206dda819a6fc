"""``python -m tokenprune.eval`` (also ``accelerate launch -m tokenprune.eval``): the eval CLI."""
import sys

from tokenprune.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))

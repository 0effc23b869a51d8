import sys

from sla_dsl.cli import main

if __name__ == "__main__":  # worker processes of a spawn pool import this module as __mp_main__
    sys.exit(main())

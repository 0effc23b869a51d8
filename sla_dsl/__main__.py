import sys

from sla_dsl.cli import main

sys.exit(main())

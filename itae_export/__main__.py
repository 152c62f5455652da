import sys

from .cli.export_cmd import export_main

sys.exit(export_main())

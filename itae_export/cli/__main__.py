import sys

from .export_cmd import export_main

sys.exit(export_main())

import sys

from ntkselect.cli.main import main

sys.exit(main())

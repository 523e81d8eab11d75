import sys

from peftlab.cli import main

sys.exit(main())

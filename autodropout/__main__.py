import sys

from autodropout.cli import main

sys.exit(main())

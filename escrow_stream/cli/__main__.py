import sys

from escrow_stream.cli import main

sys.exit(main())

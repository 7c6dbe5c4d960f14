"""`python -m agent` runs the agent CLI."""

import sys

from agent.cli import main

if __name__ == "__main__":
    sys.exit(main())

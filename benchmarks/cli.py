"""What the benchmark scripts' command lines share."""

from __future__ import annotations

import argparse


class OneLineErrors(argparse.ArgumentParser):
    """A bad option ends the script with one line on stderr (and status 2), not the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

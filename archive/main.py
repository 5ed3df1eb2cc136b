"""The program: `pacsvault VERB ...`. The two edges, the operator's verbs
(archive/cli/) and the daemon (archive/daemon/), meet only here."""
from __future__ import annotations

import os

from archive.cli.main import cli
from archive.daemon.command import serve

cli.add_command(serve)

# Patient data and secrets are never for other users, whatever umask the caller has
# (cron, a shell with 022 or 000): group may read, others get nothing. The daemon's
# workers, and every file any verb creates, inherit it. Code that creates sensitive
# files also passes explicit modes (the catalog, sites, keys).
PRIVATE_UMASK = 0o027


def main() -> None:
    os.umask(os.umask(PRIVATE_UMASK) | PRIVATE_UMASK)
    cli(prog_name="pacsvault")


if __name__ == "__main__":
    main()

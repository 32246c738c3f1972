"""`python -m gateway`, and the `fieldgate` command."""

import gc
import sys


def main() -> None:
    if sys.argv[1:2] == ["run"]:
        # No collections while the daemon imports (0.1-0.15 s of its start's 0.7 s of
        # CPU, which a crisis queued behind a backlog waits through): `tune_gc`
        # enables them once the daemon is built.
        gc.disable()
        from gateway import spawn

        spawn.start_early()
    from gateway.cli.main import main as cli

    cli()


if __name__ == "__main__":
    main()

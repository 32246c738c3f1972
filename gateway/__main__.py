"""`python -m gateway`, and the `fieldgate` command."""

import sys


def main() -> None:
    if sys.argv[1:2] == ["run"]:
        from gateway import spawn

        spawn.start_early()
    from gateway.cli.main import main as cli

    cli()


if __name__ == "__main__":
    main()

"""The `jaxsr` command: `jaxsr convert ...`, `jaxsr sr ...` (subcommands register below).

Every subcommand reports a user's mistake (missing file, wrong checkpoint, bad
option) as one clear `error:` message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from jaxsr.commands import app as app_cmd
from jaxsr.commands import convert as convert_cmd
from jaxsr.commands import demo as demo_cmd
from jaxsr.commands import eval as eval_cmd
from jaxsr.commands import plan as plan_cmd
from jaxsr.commands import quickstart as quickstart_cmd
from jaxsr.commands import sr as sr_cmd
from jaxsr.commands import train as train_cmd

EXIT_USAGE = 2


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxsr", description="Diffusion super-resolution (SeeSR, CoSeR) in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert_cmd.register(sub)
    sr_cmd.register(sub)
    demo_cmd.register(sub)
    train_cmd.register(sub)
    quickstart_cmd.register(sub)
    plan_cmd.register(sub)
    eval_cmd.register(sub)
    app_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from jaxsr.platform import configure_xla_defaults

    configure_xla_defaults()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Only commands that read a config file take `--config.key=value` overrides.
    if extra and not getattr(args, "accepts_config_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.config_overrides = extra
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user-facing boundary
        from jaxsr.commands.errors import is_user_error

        if not is_user_error(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

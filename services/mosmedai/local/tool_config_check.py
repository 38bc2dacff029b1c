"""``mosmedai tool-choice check FILE``: check a per-region tool choice file
(``mosmedai.catalog.tool_config``) against this deployment's settings, tenants and pools before
applying it."""

from __future__ import annotations

import argparse
import sys

from mosmedai.catalog.tool_config import ToolsConfigError, parse
from mosmedai.config import Settings
from mosmedai.ingress.tenants import load_tenants
from mosmedai.serving.pools import directory_for


def main(argv: list[str] | None = None) -> None:
    """``mosmedai tool-choice check FILE``: validate a file against this deployment's
    settings and tenants (MOSMEDAI_* environment); the pools of pools_file or the local default."""
    parser = argparse.ArgumentParser(prog="mosmedai tool-choice", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["check"])
    parser.add_argument("file")
    args = parser.parse_args(argv)
    settings = Settings()
    tenants = load_tenants(settings.tenants_file or None, settings.profile, settings.demo_tenants)
    directory = directory_for(settings) if settings.pool_discovery == "config" else None
    try:
        choices = parse(args.file, settings, {t.id: t.region for t in tenants.all()}, directory)
    except ToolsConfigError as error:
        sys.exit(f"{args.file}: {error}")
    print(f"{args.file}: valid; live versions {choices.live()}")


if __name__ == "__main__":
    main()

"""``mosmedai-operator`` / ``python -m mosmedai_operator``: run the GpuPool operator.

Configuration comes from ``MOSMEDAI_OPERATOR_*`` environment variables (see
``config.OperatorConfig``); Kubernetes credentials from the service account in a
cluster, or from ``$KUBECONFIG`` / ``~/.kube/config`` outside.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys

import kopf
import prometheus_client
from pydantic import ValidationError

from mosmedai_operator.config import OperatorConfig
from mosmedai_operator.handlers import build_registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mosmedai-operator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument("--json-logs", action="store_true", help="log as JSON lines")
    parser.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
    args = parser.parse_args(argv)

    try:
        config = OperatorConfig()
    except ValidationError as exc:
        print(f"mosmedai-operator: bad configuration (MOSMEDAI_OPERATOR_*):\n{exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True))
        return 0

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON if args.json_logs else kopf.LogFormat.FULL)
    logger = logging.getLogger("mosmedai_operator")
    if config.metrics_port is not None:
        prometheus_client.start_http_server(config.metrics_port)
    # Two replicas must not both act: kopf peering pauses the lower priority. A random
    # priority per start makes equal priorities (which kopf lets both run) practically impossible.
    priority = config.peering_priority if config.peering_priority is not None else random.randint(1, 2**31 - 1)
    logger.info(f"starting: namespaces={config.namespaces or 'cluster-wide'} standalone={config.standalone} priority={priority}")
    kopf.run(
        registry=build_registry(config),
        standalone=config.standalone,
        priority=priority,
        # A peering name makes peering mandatory in kopf: only when peering is wanted.
        peering_name=None if config.standalone else config.peering_name,
        namespaces=config.namespaces,
        clusterwide=not config.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

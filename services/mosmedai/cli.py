"""The `mosmedai` command: run the local platform and submit studies to it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

from mosmedai.tenants import DEMO_TOKENS, auth_headers

from mosmedai.config import Settings


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as error:  # pydantic names the bad field
        sys.exit(f"mosmedai: bad configuration: {error}")


def cmd_up(args: argparse.Namespace) -> int:
    from mosmedai import local

    settings = _settings()
    try:
        urls = local.up(settings)
    except RuntimeError as error:
        print(f"mosmedai up: {error}", file=sys.stderr)
        return 1
    print("mosmedai is up.")
    for name, url in urls.items():
        print(f"  {name:15s} {url}")
    print(f"  {'logs':15s} {settings.log_dir}")
    print("Try:")
    print(f"  curl -s -X POST -H 'Authorization: Bearer {DEMO_TOKENS['demo-moscow']}' "
          f"-H 'Content-Type: application/dicom' --data-binary @chest.dcm {urls['gateway']}/v1/studies")
    print("  mosmedai submit chest.dcm        # `mosmedai example chest.dcm` writes a synthetic one")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from mosmedai import local

    stopped = local.down(_settings())
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from mosmedai import local

    for group, pid in local.status(_settings()).items():
        print(f"{group:8s} {'running, pid ' + str(pid) if pid else 'stopped'}")
    return 0


def format_result(path: str, result: dict) -> str:
    lines = [f"{path}  study {result['study_instance_uid']}  modality {result['modality']}  "
             f"{result['timings_ms']['total']:.0f} ms"]
    lines.append(f"  {'tool':20s} {'probability':>11s}  {'finding':30s} location (row0,col0)-(row1,col1) px")
    for tool in result["tools"]:
        probability = tool["scores"].get("probability", float("nan"))
        if tool["findings"]:
            for finding in tool["findings"]:
                box = finding.get("location")
                where = (f"({box['row0']:.0f},{box['col0']:.0f})-({box['row1']:.0f},{box['col1']:.0f})"
                         if box else "-")
                lines.append(f"  {tool['tool']:20s} {probability:11.3f}  {finding['finding']:30s} {where}")
        else:
            lines.append(f"  {tool['tool']:20s} {probability:11.3f}  {'no finding':30s} -")
    return "\n".join(lines)


def cmd_submit(args: argparse.Namespace) -> int:
    settings = _settings()
    url = args.url or f"http://{settings.bind_host}:{settings.gateway_http_port}"
    failed = 0
    with httpx.Client(base_url=url, timeout=args.timeout, headers=auth_headers()) as client:
        for path in args.files:
            try:
                body = Path(path).read_bytes()
            except OSError as error:
                print(f"{path}: cannot read: {error}", file=sys.stderr)
                failed += 1
                continue
            try:
                answer = client.post("/v1/studies", content=body, headers={"Content-Type": "application/dicom"})
            except httpx.HTTPError as error:
                print(f"{path}: gateway at {url} unreachable ({error}); is the platform up (`make up`)?",
                      file=sys.stderr)
                return 2
            if answer.status_code != 200:
                failed += 1
                print(f"{path}: HTTP {answer.status_code}: {answer.text}", file=sys.stderr)
                continue
            print(json.dumps(answer.json(), indent=2) if args.json else format_result(path, answer.json()))
    return 1 if failed else 0


def cmd_example(args: argparse.Namespace) -> int:
    from mosmedai.training.phantoms import make_phantom, write_dicom

    findings = [] if args.finding == "none" else [args.finding]
    phantom = make_phantom((args.seed, 0), shape=(2500, 2048), findings=findings)
    write_dicom(phantom, args.output)
    box = phantom.boxes.get(args.finding) if findings else None
    print(f"wrote {args.output}: synthetic 2500x2048 DX chest radiograph"
          + (f", {args.finding} drawn at (row0,col0,row1,col1) {box}" if box else ", no finding"))
    return 0


def cmd_tools(args: argparse.Namespace) -> int:
    from mosmedai import byo

    try:
        if args.action == "check":
            print(byo.check(args.package))
        else:
            from mosmedai.config import REPO_ROOT

            repository = args.repository or REPO_ROOT / "model_repository"
            written = byo.install(args.package, repository)
            print(f"installed {args.package} into {repository} ({len(written)} files); serve it with "
                  f"MOSMEDAI_TOOL_PACKAGES={Path(args.package).resolve()} set for the platform")
    except byo.PackageError as error:
        print(f"{args.package}: refused:\n{error}", file=sys.stderr)
        return 1
    return 0


#: Subcommands with parsers of their own (the capacity planner in load_tests/mosmedai_load).
DELEGATED = {
    "capacity": ("mosmedai_load.capacity", "plan GPUs per region pool for a quarter of national volume"),
    "profile": ("mosmedai_load.profile", "measure per-tool service times of a live Triton at several batch sizes"),
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in DELEGATED:
        import importlib

        module = importlib.import_module(DELEGATED[args[0]][0])
        sys.exit(module.main(args[1:]))
    parser = argparse.ArgumentParser(prog="mosmedai", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start the local platform (Triton + Ray Serve)").set_defaults(run=cmd_up)
    commands.add_parser("down", help="stop everything `up` started").set_defaults(run=cmd_down)
    commands.add_parser("status", help="which local processes run").set_defaults(run=cmd_status)
    submit = commands.add_parser("submit", help="send DICOM files, print the findings")
    submit.add_argument("files", nargs="+", metavar="FILE")
    submit.add_argument("--url", help="gateway URL (default: the local one)")
    submit.add_argument("--json", action="store_true", help="print the JSON answers")
    submit.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    submit.set_defaults(run=cmd_submit)
    example = commands.add_parser("example", help="write a synthetic chest X-ray DICOM file")
    example.add_argument("output", metavar="FILE")
    example.add_argument("--finding", choices=["none", "cxr_opacity", "cxr_nodule", "cxr_pneumothorax"],
                         default="cxr_nodule")
    example.add_argument("--seed", type=int, default=7)
    example.set_defaults(run=cmd_example)
    tools = commands.add_parser("tools", help="tool packages (model.onnx + manifest.yaml): check or install one")
    tools.add_argument("action", choices=["check", "install"])
    tools.add_argument("package", metavar="DIR")
    tools.add_argument("--repository", type=Path, help="Triton model repository (default: model_repository/)")
    tools.set_defaults(run=cmd_tools)
    for name, (_, summary) in DELEGATED.items():
        commands.add_parser(name, help=f"{summary} (`mosmedai {name} --help`)", add_help=False)
    parsed = parser.parse_args(args)
    sys.exit(parsed.run(parsed))


if __name__ == "__main__":
    main()

"""The `mosmedai` command: run the local platform, submit studies to it, and manage its tools
(packages; the admission gate of tool versions: ``mosmedai.catalog.version_admission``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

from mosmedai.config import Settings
from mosmedai.ingress.tenants import DEMO_TOKENS, auth_headers


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as error:  # pydantic names the bad field
        sys.exit(f"mosmedai: bad configuration: {error}")


def cmd_up(args: argparse.Namespace) -> int:
    from mosmedai.local import processes as local

    settings = _settings()
    try:
        urls = local.up(settings)
    except RuntimeError as error:
        print(f"mosmedai up: {error}", file=sys.stderr)
        return 1
    print("mosmedai is up.")
    width = max(len(name) for name in [*urls, "logs"])
    for name, url in urls.items():
        print(f"  {name:{width}s} {url}")
    print(f"  {'logs':{width}s} {settings.log_dir}")
    print("Try:")
    print(f"  curl -s -X POST -H 'Authorization: Bearer {DEMO_TOKENS['demo-moscow']}' "
          f"-H 'Content-Type: application/dicom' --data-binary @chest.dcm {urls['gateway']}/v1/studies")
    print("  mosmedai submit chest.dcm        # `mosmedai example chest.dcm` writes a synthetic one")
    print(f"  curl -s -H 'Authorization: Bearer {DEMO_TOKENS['demo-tatarstan']}' {urls['gateway']}/v1/pools"
          "   # the pools, their state and load")
    print("  mosmedai example examples --family all && mosmedai submit examples/ct_brain   # every family")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from mosmedai.local import processes as local

    stopped = local.down(_settings())
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from mosmedai.local import processes as local

    settings = _settings()
    pools = {group: f"{group} (pool {pool})" for group, (pool, _, _) in local.local_pools(settings).items()}
    for group, pid in local.status(settings).items():
        print(f"{pools.get(group, group):26s} {'running, pid ' + str(pid) if pid else 'stopped'}")
    return 0


#: UCUM units as people read them next to a number (unitless and slice indices: none).
_UNITS = {"1": "", "{slice}": "", "[hnsf'U]": " HU", "deg": " deg"}


def _tool_lines(tools: list[dict]) -> list[str]:
    lines = [f"  {'tool':20s} {'probability':>11s}  {'finding':30s} location (row0,col0)-(row1,col1) px"]
    for tool in tools:
        probability = tool["scores"].get("probability", float("nan"))
        if tool["findings"]:
            for finding in tool["findings"]:
                box = finding.get("location")
                where = (f"({box['row0']:.0f},{box['col0']:.0f})-({box['row1']:.0f},{box['col1']:.0f})"
                         if box else "-")
                lines.append(f"  {tool['tool']:20s} {probability:11.3f}  {finding['finding']:30s} {where}")
        else:
            lines.append(f"  {tool['tool']:20s} {probability:11.3f}  {'no finding':30s} -")
        measured = [f"{m['name']} {m['label']}" if m.get("label") is not None else
                    f"{m['name']} {m['value']:g}{_UNITS.get(m['unit'], ' ' + m['unit'])}" if m.get("value") is not None
                    else f"{m['name']} n/a" for m in tool.get("measurements", [])]
        if measured:
            lines.append(f"  {'':20s} {'':11s}  " + ", ".join(measured))
    return lines


def format_result(path: str, result: dict, names: dict[str, str] | None = None) -> str:
    """One image's answer (StudyResult), or a multi-instance study's (StudyResults: one
    block per image and per volume series; ``names`` labels an item by its first SOP
    Instance UID, e.g. with its file name)."""
    if "results" not in result:
        return "\n".join([f"{path}  study {result['study_instance_uid']}  modality {result['modality']}  "
                          f"{result['timings_ms']['total']:.0f} ms", *_tool_lines(result["tools"])])
    lines = [f"{path}  study {result['study_instance_uid']}  {len(result['results'])} item(s)  "
             f"{result['timings_ms']['total']:.0f} ms"]
    for item in result["results"]:
        single = len(item["sop_instance_uids"]) == 1  # an image: its file's name
        label = (names or {}).get(item["sop_instance_uids"][0], "") if single else ""
        lines.append(f" {item['kind']} {item['modality']}" + (f" {label}" if label else "")
                     + f", series {item['series_instance_uid']}, {len(item['sop_instance_uids'])} instance(s)")
        lines += _tool_lines(item["tools"])
    return "\n".join(lines)


def _request(path: str) -> tuple[bytes, str, dict[str, str]]:
    """One file as application/dicom; a folder's .dcm files (a study or series) as one
    multipart/related request, with the file name of each SOP Instance UID."""
    import io

    import pydicom

    from mosmedai.pipeline.multipart import multipart_body

    folder = Path(path)
    if not folder.is_dir():
        return folder.read_bytes(), "application/dicom", {}
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise OSError(f"no .dcm files in the folder {path}")
    payloads = [file.read_bytes() for file in files]
    names = {}
    for file, payload in zip(files, payloads):
        try:
            header = pydicom.dcmread(io.BytesIO(payload), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            names[str(header.SOPInstanceUID)] = file.name
        except Exception:  # the gateway names what is wrong with the file
            pass
    return *multipart_body(payloads), names


def cmd_submit(args: argparse.Namespace) -> int:
    settings = _settings()
    url = args.url or f"http://{settings.bind_host}:{settings.gateway_http_port}"
    failed = 0
    with httpx.Client(base_url=url, timeout=args.timeout, headers=auth_headers()) as client:
        for path in args.files:
            try:
                body, content_type, names = _request(path)
            except OSError as error:
                print(f"{path}: cannot read: {error}", file=sys.stderr)
                failed += 1
                continue
            try:
                answer = client.post("/v1/studies", content=body, headers={"Content-Type": content_type})
            except httpx.HTTPError as error:
                print(f"{path}: gateway at {url} unreachable ({error}); is the platform up (`make up`)?",
                      file=sys.stderr)
                return 2
            if answer.status_code != 200:
                failed += 1
                print(f"{path}: HTTP {answer.status_code}: {answer.text}", file=sys.stderr)
                continue
            print(json.dumps(answer.json(), indent=2) if args.json else format_result(path, answer.json(), names))
    return 1 if failed else 0


def cmd_example(args: argparse.Namespace) -> int:
    from mosmedai.local import examples

    if args.family == "all":
        for family in examples.FAMILIES:
            example = examples.make_example(family, args.seed)
            paths = examples.write_example(example, Path(args.output) / examples.example_name(family))
            where = paths[0] if len(paths) == 1 else f"{paths[0].parent}/ ({len(paths)} files)"
            print(f"wrote {where}: {example.description}")
        print(f"send one with `mosmedai submit {Path(args.output) / 'ct_chest'}` (a folder is one study)")
        return 0
    finding = None if args.finding == "none" else (args.finding or "default")
    try:
        example = examples.make_example(args.family, args.seed, finding)
    except ValueError as error:
        print(f"mosmedai example: {error}", file=sys.stderr)
        return 2
    paths = examples.write_example(example, args.output)
    where = args.output if len(paths) == 1 else f"{args.output}/ ({len(paths)} files)"
    print(f"wrote {where}: {example.description}")
    return 0


def cmd_tools_compare(args: argparse.Namespace) -> int:
    """`mosmedai tools compare TOOL --version V`: agreement of V's shadow runs with the live
    version, per region, from the object store (mosmedai.studies.shadow)."""
    import json

    from mosmedai.catalog.tools import CATALOG
    from mosmedai.jobs.store import object_store
    from mosmedai.studies import shadow

    tool = args.tool
    if tool not in CATALOG:
        print(f"tools compare: unknown tool {tool!r}; known: {sorted(CATALOG)}", file=sys.stderr)
        return 2
    if args.version is None or args.version not in CATALOG[tool].versions:
        print(f"tools compare: --version: tool {tool} has versions {list(CATALOG[tool].versions)}; name one",
              file=sys.stderr)
        return 2
    settings = _settings()
    records = shadow.read_records(object_store(settings), settings.results_bucket, tool, version=args.version)
    groups = {key: figures for key, figures in shadow.by_version_and_region(records).items()
              if args.region is None or key[1] == args.region}
    if args.json:
        print(json.dumps({"tool": tool, "version": args.version,
                          "regions": {region: figures for (_, region), figures in groups.items()}}, indent=2))
    else:
        print(shadow.format_comparison(tool, args.version, groups))
    return 0


def cmd_tools(args: argparse.Namespace) -> int:
    from mosmedai.catalog import byo
    from mosmedai.serving import model_repo

    try:
        if args.action == "check":
            print(byo.check(args.package))
        else:
            from mosmedai.config import REPO_ROOT

            repository = args.repository or REPO_ROOT / "model_repository"
            written = model_repo.install_package(args.package, repository)
            print(f"installed {args.package} into {repository} ({len(written)} files); serve it with "
                  f"MOSMEDAI_TOOL_PACKAGES={Path(args.package).resolve()} set for the platform")
    except byo.PackageError as error:
        print(f"{args.package}: refused:\n{error}", file=sys.stderr)
        return 1
    return 0


def _admission_records(settings: Settings):
    from mosmedai.catalog.version_admission import AdmissionRecords
    from mosmedai.jobs.store import object_store

    return AdmissionRecords(object_store(settings), settings.results_bucket)


def format_decision(decision) -> str:
    """A decision as the operator reads it: the verdict, then each figure against its bound."""
    head = f"{decision.tool} version {decision.version}: {decision.decision.upper()}"
    if decision.missing:
        return "\n".join([f"{head} before sending anything; missing:", *(f"  - {m}" for m in decision.missing)])
    lines = [f"{head} ({decision.n} cases of the held-out reference set, seed {decision.seed}, through "
             f"{decision.platform}, {decision.seconds:g} s)",
             f"  {'metric':24s} {'figure':>8s}  {'threshold':12s} result"]
    for check in decision.checks or []:
        figure = "n/a" if check["value"] is None else f"{check['value']:.4f}"
        lines.append(f"  {check['metric']:24s} {figure:>8s}  {check['op'] + ' ' + format(check['bound'], 'g'):12s} "
                     f"{'pass' if check['passed'] else 'FAIL'}")
    return "\n".join(lines)


def cmd_admit(args: argparse.Namespace) -> int:
    from mosmedai.catalog.version_admission import AdmissionError
    from mosmedai.local.admit import admit
    from mosmedai.jobs.storage import StorageError

    settings = _settings()
    url = args.url or f"http://{settings.bind_host}:{settings.gateway_http_port}"
    repository = args.repository or settings.model_repository

    def progress(done: int, total: int) -> None:
        if done % 10 == 0 or done == total:
            print(f"  {done}/{total} cases answered", file=sys.stderr, flush=True)

    try:
        with httpx.Client(base_url=url, timeout=args.timeout, headers=auth_headers(args.token)) as client:
            decision = admit(args.tool, args.version, client, _admission_records(settings), Path(repository),
                             n=args.n, concurrency=args.concurrency, progress=progress)
    except AdmissionError as error:
        print(f"mosmedai tools admit: {error}; nothing decided, nothing recorded", file=sys.stderr)
        return 2
    except httpx.HTTPError as error:
        print(f"mosmedai tools admit: gateway at {url} unreachable ({error}); nothing decided", file=sys.stderr)
        return 2
    except StorageError as error:
        print(f"mosmedai tools admit: the decision could not be recorded: {error}", file=sys.stderr)
        return 2
    print(json.dumps(json.loads(decision.to_json())) if args.json else format_decision(decision))
    print(f"recorded as s3://{settings.results_bucket}/{decision.key}", file=sys.stderr)
    return 0 if decision.admitted else 1


def cmd_history(args: argparse.Namespace) -> int:
    from mosmedai.catalog.tools import CATALOG
    from mosmedai.jobs.storage import StorageError

    if args.tool not in CATALOG:
        print(f"mosmedai tools history: unknown tool {args.tool!r}; known: {sorted(CATALOG)}", file=sys.stderr)
        return 2
    if args.version is not None and args.version not in CATALOG[args.tool].versions:
        print(f"mosmedai tools history: tool {args.tool} has no version {args.version}; its versions: "
              f"{list(CATALOG[args.tool].versions)}", file=sys.stderr)
        return 2
    settings = _settings()
    try:
        decisions = _admission_records(settings).history(args.tool, args.version)
    except StorageError as error:
        print(f"mosmedai tools history: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{**json.loads(d.to_json()), "key": d.key} for d in decisions], indent=1))
        return 0
    if not decisions:
        print(f"no admission decisions for {args.tool}" + (f" version {args.version}" if args.version else ""))
        return 0
    print(f"{'when (UTC)':27s} {'version':>7s}  {'decision':8s} {'cases':>5s}  {'operator':16s} why")
    for d in decisions:
        print(f"{d.when:27s} {d.version:>7d}  {d.decision:8s} {d.n:>5d}  {(d.operator + '@' + d.host)[:16]:16s} "
              f"{d.reason}")
    return 0


#: Subcommands with parsers of their own (the capacity planner in load_tests/mosmedai_load).
DELEGATED = {
    "tenants": ("mosmedai.ingress.tenants", "hash a tenant token (hash-token TOKEN), or check a tenants file (check FILE)"),
    "tool-choice": ("mosmedai.local.tool_config_check", "check a per-region tool choice file (check FILE) against "
                    "this deployment"),
    "capacity": ("mosmedai_load.capacity", "plan GPUs per region pool for a quarter of national volume"),
    "profile": ("mosmedai_load.profile", "measure per-tool service times of a live Triton at several batch sizes"),
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in DELEGATED:
        import importlib

        module = importlib.import_module(DELEGATED[args[0]][0])
        sys.exit(module.main(args[1:]))
    from mosmedai.local.examples import FAMILIES, FINDINGS

    parser = argparse.ArgumentParser(prog="mosmedai", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start the local platform (Triton + Ray Serve)").set_defaults(run=cmd_up)
    commands.add_parser("down", help="stop everything `up` started").set_defaults(run=cmd_down)
    commands.add_parser("status", help="which local processes run").set_defaults(run=cmd_status)
    submit = commands.add_parser("submit", help="send DICOM files (a folder: one study), print the findings")
    submit.add_argument("files", nargs="+", metavar="FILE_OR_FOLDER")
    submit.add_argument("--url", help="gateway URL (default: the local one)")
    submit.add_argument("--json", action="store_true", help="print the JSON answers")
    submit.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    submit.set_defaults(run=cmd_submit)
    example = commands.add_parser(
        "example", help="write a synthetic example study of a family (chest X-ray by default, or all of them)",
        description="Write a synthetic DICOM example: one file for chest_xray, fluorography and spine_xray; "
                    "a folder for mammography (4 views) and the CT series; with --family all, every family "
                    "into the folder OUTPUT. `mosmedai submit` sends a folder as one study.")
    example.add_argument("output", metavar="OUTPUT", help="file (image families) or folder")
    example.add_argument("--family", choices=["all", *FAMILIES], default="chest_xray")
    example.add_argument("--finding", metavar="NAME",
                         help="what to draw, per family: " + "; ".join(
                             f"{family}: {', '.join(found)}" for family, found in FINDINGS.items())
                         + " (default: the first; `none` for a clean example)")
    example.add_argument("--seed", type=int, default=7)
    example.set_defaults(run=cmd_example)
    tools = commands.add_parser("tools", help="tool packages (check, install), the admission gate of tool "
                                "versions (admit, history) and shadow runs (compare)")
    actions = tools.add_subparsers(dest="action", required=True)
    for action, summary in (("check", "validate a tool package (model.onnx + manifest.yaml)"),
                            ("install", "add a tool package to a Triton model repository")):
        package = actions.add_parser(action, help=summary)
        package.add_argument("package", metavar="DIR")
        package.add_argument("--repository", type=Path, help="Triton model repository (default: model_repository/)")
        package.set_defaults(run=cmd_tools)
    admit = actions.add_parser(
        "admit", help="run a tool version's held-out reference set through the platform; admit it only if it "
        "clears its model card's thresholds (the decision is recorded)",
        description="Runs the held-out reference set of TOOL (its family's cases at the evaluation's seed) through "
        "the running platform's POST /v1/studies pinned to VERSION, scores the answers as the evaluation does and "
        "compares each figure with the '## Admission thresholds' of the version's MODEL_CARD.md. The decision "
        "(admitted or refused, with the figures) is recorded in the object store; `mosmedai tools history` shows "
        "it. Exit status: 0 admitted, 1 refused, 2 nothing decided (an error).")
    admit.add_argument("tool", metavar="TOOL")
    admit.add_argument("version", metavar="VERSION", type=int)
    admit.add_argument("-n", type=int, default=None, help="reference cases (default: as many as the version's "
                       "evaluation.json; fewer is quicker and noisier)")
    admit.add_argument("--url", help="gateway URL (default: the local one)")
    admit.add_argument("--token", help="a tenant's bearer token (default: MOSMEDAI_TOKEN, else the local demo one)")
    admit.add_argument("--repository", type=Path, help="where the model cards are (default: the configured "
                       "model repository)")
    admit.add_argument("--concurrency", type=int, default=2, help="cases in flight at once")
    admit.add_argument("--timeout", type=float, default=300.0, help="seconds per case")
    admit.add_argument("--json", action="store_true", help="print the decision record as JSON")
    admit.set_defaults(run=cmd_admit)
    history = actions.add_parser("history", help="the admission decisions of a tool, newest first")
    history.add_argument("tool", metavar="TOOL")
    history.add_argument("--version", type=int, help="only this version's decisions")
    history.add_argument("--json", action="store_true", help="the decision records as JSON")
    history.set_defaults(run=cmd_history)
    compare = actions.add_parser("compare", help="a version run in shadow: its agreement with the live version, "
                                 "per region")
    compare.add_argument("tool", metavar="TOOL")
    compare.add_argument("--version", type=int, help="the version that ran in shadow")
    compare.add_argument("--region", help="only this region (ISO 3166-2:RU)")
    compare.add_argument("--json", action="store_true", help="the figures as JSON")
    compare.set_defaults(run=cmd_tools_compare)
    for name, (_, summary) in DELEGATED.items():
        commands.add_parser(name, help=f"{summary} (`mosmedai {name} --help`)", add_help=False)
    parsed = parser.parse_args(args)
    sys.exit(parsed.run(parsed))


if __name__ == "__main__":
    main()

"""Fill in and send the EMR API requests kept beside this file.

Every JSON file here is one API request body with `@NAME@` placeholders (bucket, subnet, roles,
ids). `render` fills them and checks the result against the service model botocore ships, offline;
`send` does the same and then calls the API with boto3. The AWS CLI has no JSON-request form of
RunJobFlow or AddJobFlowSteps (`aws emr run-job-flow` and `add-job-flow-steps` are removed from the
CLI in favour of `create-cluster` and `add-steps`, which take a different format), hence `send`.

    python deploy/emr/emr_request.py render deploy/emr/serverless-score.json BUCKET=my-bucket ...
    python deploy/emr/emr_request.py send deploy/emr/cluster.json BUCKET=my-bucket SUBNET_ID=subnet-...
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import botocore.session
from botocore.model import ListShape, MapShape, Shape, StructureShape
from botocore.validate import ParamValidator

HERE = Path(__file__).resolve().parent
#: Each request file and the (service, operation) it is the body of.
REQUESTS: dict[str, tuple[str, str]] = {
    "cluster.json": ("emr", "RunJobFlow"),
    "steps-train.json": ("emr", "AddJobFlowSteps"),
    "steps-score.json": ("emr", "AddJobFlowSteps"),
    "serverless-application.json": ("emr-serverless", "CreateApplication"),
    "serverless-train.json": ("emr-serverless", "StartJobRun"),
    "serverless-score.json": ("emr-serverless", "StartJobRun"),
}
PLACEHOLDER = re.compile(r"@([A-Z][A-Z0-9_]*)@")


def placeholders(text: str) -> set[str]:
    return set(PLACEHOLDER.findall(text))


def render(path: Path, values: dict[str, str]) -> dict[str, Any]:
    """The request in `path` with every `@NAME@` replaced by `values[NAME]`."""
    text = path.read_text()
    missing = sorted(placeholders(text) - set(values))
    if missing:
        raise ValueError(
            f"{path.name} needs values for {', '.join(missing)}; pass them as NAME=VALUE arguments"
        )
    return json.loads(PLACEHOLDER.sub(lambda m: values[m.group(1)], text))


def operation_of(path: Path) -> tuple[str, str]:
    try:
        return REQUESTS[path.name]
    except KeyError:
        raise ValueError(
            f"{path.name} is not a known request file; expected one of {', '.join(REQUESTS)}"
        ) from None


def validate(service: str, operation: str, request: dict[str, Any]) -> None:
    """Raise ValueError listing every way `request` breaks the operation's input shape."""
    model = botocore.session.get_session().get_service_model(service).operation_model(operation)
    # Like botocore's generate_idempotent_uuid handler: tokens such as clientToken are filled in
    # at call time, so a request file leaves them out.
    filled = {name: "idempotency-token" for name in model.idempotent_members} | request
    report = ParamValidator().validate(filled, model.input_shape)
    errors = [report.generate_report()] if report.has_errors() else []
    errors += enum_errors(request, model.input_shape, "")
    if errors:
        raise ValueError(f"{service} {operation} request is invalid:\n" + "\n".join(errors))


def enum_errors(value: Any, shape: Shape, path: str) -> list[str]:
    """Values outside a string enum; botocore's validator leaves these to the service."""
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        return [e for k, v in value.items() if k in shape.members
                for e in enum_errors(v, shape.members[k], f"{path}.{k}".lstrip("."))]
    if isinstance(shape, ListShape) and isinstance(value, list):
        return [e for i, v in enumerate(value) for e in enum_errors(v, shape.member, f"{path}[{i}]")]
    if isinstance(shape, MapShape) and isinstance(value, dict):
        return [e for k, v in value.items() for e in enum_errors(v, shape.value, f"{path}.{k}")]
    enum = getattr(shape, "enum", None)  # only StringShape has one
    if enum and value not in enum:
        return [f"Invalid value for parameter {path}, value: {value!r}, valid values: "
                f"{', '.join(enum)}"]
    return []


def send(service: str, operation: str, request: dict[str, Any]) -> dict[str, Any]:
    import boto3

    # RunJobFlow -> run_job_flow: boto3's method names are the snake_case operation names.
    method = getattr(boto3.client(service), re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower())
    return method(**request)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("render", "send"))
    parser.add_argument("file", type=Path)
    parser.add_argument("values", nargs="*", metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    bad = [v for v in args.values if "=" not in v]
    if bad:
        parser.error(f"expected NAME=VALUE, got {bad[0]!r}")
    values = dict(v.split("=", 1) for v in args.values)
    try:
        service, operation = operation_of(args.file)
        request = render(args.file, values)
        validate(service, operation, request)
    except ValueError as exc:
        print(f"emr_request: {exc}", file=sys.stderr)
        return 2
    if args.action == "render":
        print(json.dumps(request, indent=2))
    else:
        response = send(service, operation, request)
        response.pop("ResponseMetadata", None)
        print(json.dumps(response, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

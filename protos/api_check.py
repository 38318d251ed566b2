"""Lint and breaking-change check of protos/ against the committed API snapshot (api_snapshot.json).

    python protos/api_check.py            # lint + compare; exit 1 listing every problem
    python protos/api_check.py --accept   # after a deliberate, compatible change: rewrite the snapshot

The snapshot is what other systems' generated code depends on: every message's fields (name,
number, type, label), enums, and every service's methods (request and response types,
streaming). Compared with it, the current .proto files may add messages, fields, enum values,
services and methods; removing, renumbering, renaming or retyping any of them breaks clients
built from the snapshot and fails the check (the wire rules of proto3 and of the JSON mapping,
as buf's FILE/WIRE_JSON categories). The .proto files are compiled from source by protoc, so
the check sees exactly what a client in another language would generate from.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SNAPSHOT = ROOT / "api_snapshot.json"


def descriptor_set(root: Path = ROOT):
    """The FileDescriptorSet of every .proto under ``root``, compiled by protoc from source."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "api.pb"
        if protoc.main(["protoc", f"-I{root}", f"-I{include}", f"--descriptor_set_out={out}", *protos]) != 0:
            raise SystemExit(f"protoc failed on {protos}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def snapshot(fds) -> dict:
    """The API surface as plain JSON: {"messages", "enums", "services"}, keyed by full name."""
    from google.protobuf import descriptor_pb2 as d

    types = {v: k[len("TYPE_"):].lower() for k, v in d.FieldDescriptorProto.Type.items()}
    labels = {v: k[len("LABEL_"):].lower() for k, v in d.FieldDescriptorProto.Label.items()}
    api = {"messages": {}, "enums": {}, "services": {}}

    def add_enum(prefix, e):
        api["enums"][f"{prefix}.{e.name}"] = {v.name: v.number for v in e.value}

    def add_message(prefix, m):
        name = f"{prefix}.{m.name}"
        api["messages"][name] = {f.name: {"number": f.number, "type": f.type_name.lstrip(".") or types[f.type],
                                          "label": labels[f.label]} for f in m.field}
        for nested in m.nested_type:
            add_message(name, nested)
        for e in m.enum_type:
            add_enum(name, e)

    for f in fds.file:
        for m in f.message_type:
            add_message(f.package, m)
        for e in f.enum_type:
            add_enum(f.package, e)
        for s in f.service:
            api["services"][f"{f.package}.{s.name}"] = {
                m.name: {"input": m.input_type.lstrip("."), "output": m.output_type.lstrip("."),
                         "client_streaming": m.client_streaming, "server_streaming": m.server_streaming}
                for m in s.method}
    return api


def breaking_changes(old: dict, new: dict) -> list[str]:
    """What a client built from ``old`` would no longer find, or would read differently, in ``new``."""
    problems = []
    for msg, fields in old["messages"].items():
        if msg not in new["messages"]:
            problems.append(f"message {msg} removed")
            continue
        now = new["messages"][msg]
        by_number = {f["number"]: name for name, f in now.items()}
        for name, f in fields.items():
            if name not in now:
                moved = by_number.get(f["number"])
                problems.append(f"{msg}.{name} (field {f['number']}) " +
                                (f"renamed to {moved}" if moved else "removed"))
                continue
            for key in ("number", "type", "label"):
                if now[name][key] != f[key]:
                    problems.append(f"{msg}.{name}: {key} changed from {f[key]} to {now[name][key]}")
    for enum, values in old["enums"].items():
        now = new["enums"].get(enum)
        if now is None:
            problems.append(f"enum {enum} removed")
            continue
        problems += [f"{enum}.{v}: number changed or value removed" for v, n in values.items() if now.get(v) != n]
    for service, methods in old["services"].items():
        if service not in new["services"]:
            problems.append(f"service {service} removed")
            continue
        for method, sig in methods.items():
            now = new["services"][service].get(method)
            if now is None:
                problems.append(f"{service}.{method} removed")
                continue
            problems += [f"{service}.{method}: {k} changed from {sig[k]} to {now[k]}" for k in sig if now[k] != sig[k]]
    return problems


def lint(fds) -> list[str]:
    """The conventions of Google's API style guide that generated code in other languages relies on."""
    problems = []
    pascal, snake, upper = re.compile(r"^[A-Z][A-Za-z0-9]*$"), re.compile(r"^[a-z][a-z0-9_]*$"), re.compile(r"^[A-Z][A-Z0-9_]*$")
    for f in fds.file:
        if not re.fullmatch(r"[a-z]+(\.[a-z0-9]+)*\.v\d+", f.package):
            problems.append(f"{f.name}: package {f.package!r} must end in a version (e.g. tribune.v1)")
        if Path(f.name).parent.as_posix() != f.package.replace(".", "/"):
            problems.append(f"{f.name}: the folder must mirror the package {f.package}")
        if f.syntax != "proto3":
            problems.append(f"{f.name}: syntax must be proto3")
        stack = [(f.package, m) for m in f.message_type]
        while stack:
            prefix, m = stack.pop()
            if not pascal.match(m.name):
                problems.append(f"message {prefix}.{m.name}: name must be PascalCase")
            numbers = [fd.number for fd in m.field]
            if len(numbers) != len(set(numbers)):
                problems.append(f"message {prefix}.{m.name}: a field number is used twice")
            problems += [f"{prefix}.{m.name}.{fd.name}: field names must be lower_snake_case"
                         for fd in m.field if not snake.match(fd.name)]
            stack += [(f"{prefix}.{m.name}", n) for n in m.nested_type]
        for e in f.enum_type:
            problems += [f"{f.package}.{e.name}.{v.name}: enum values must be UPPER_SNAKE_CASE"
                         for v in e.value if not upper.match(v.name)]
        for s in f.service:
            problems += [f"{f.package}.{s.name}.{m.name}: method names must be PascalCase"
                         for m in s.method if not pascal.match(m.name)]
    return problems


def check(root: Path = ROOT, snapshot_path: Path = SNAPSHOT) -> list[str]:
    """Every lint problem and breaking change of the protos under ``root``; empty when all is well."""
    fds = descriptor_set(root)
    return lint(fds) + breaking_changes(json.loads(Path(snapshot_path).read_text()), snapshot(fds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accept", action="store_true", help="rewrite api_snapshot.json from the current protos")
    args = ap.parse_args()
    if args.accept:
        fds = descriptor_set()
        problems = lint(fds) + (breaking_changes(json.loads(SNAPSHOT.read_text()), snapshot(fds))
                                if SNAPSHOT.exists() else [])
        if problems:
            print("\n".join(["not accepted:", *problems]), file=sys.stderr)
            return 1
        SNAPSHOT.write_text(json.dumps(snapshot(fds), indent=2, sort_keys=True) + "\n")
        print(f"wrote {SNAPSHOT}")
        return 0
    problems = check()
    print("\n".join(problems) if problems else "protos: lint clean, compatible with api_snapshot.json")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

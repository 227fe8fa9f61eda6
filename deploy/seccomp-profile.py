#!/usr/bin/env python3
"""The gateway's seccomp profile for Kubernetes nodes.

    python3 deploy/seccomp-profile.py [--arch ARCH] [SOURCE] > dns-egress-gateway.json

SOURCE (default target/image/seccomp-loader.json, which `cargo xtask image`
writes) is podman's default profile with bpf() and perf_event_open()
allowed. It is in the Docker/podman format, whose rules may apply only
with some capabilities or on some architectures (`includes`, `excludes`,
`archMap`). podman and CRI-O evaluate those; containerd reads a Localhost
profile as plain OCI runtime-spec JSON and ignores them, which would turn
every conditional rule into an unconditional one (both the allow and the
refusal of e.g. chroot). This writes the profile as the OCI
runtime spec has it, with every condition evaluated the way podman would
for the gateway's containers on ARCH: as holding at most CAP_BPF,
CAP_PERFMON and CAP_NET_ADMIN (--caps), none of which the default profile
conditions on. The result means the same to containerd, CRI-O and podman.

ARCH is the nodes' architecture as Go names it (amd64, arm64, ...;
default: this machine's). A system call the source both allows and
refuses without conditions is refused. Fails, saying why, unless the
result allows bpf and perf_event_open unconditionally.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
from typing import Any

# Go's architecture names (the `arches` of the Docker format) and the
# native libseccomp architecture of each (the `archMap` keys).
GO_ARCH = {
    "x86_64": "amd64", "amd64": "amd64",
    "aarch64": "arm64", "arm64": "arm64",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
    "i386": "386", "i686": "386", "armv7l": "arm",
}
NATIVE = {
    "amd64": "SCMP_ARCH_X86_64", "arm64": "SCMP_ARCH_AARCH64", "ppc64le": "SCMP_ARCH_PPC64LE",
    "s390x": "SCMP_ARCH_S390X", "riscv64": "SCMP_ARCH_RISCV64", "386": "SCMP_ARCH_X86",
    "arm": "SCMP_ARCH_ARM",
}
# The capabilities the gateway's containers hold at most (the loader's).
GATEWAY_CAPS = "BPF,PERFMON,NET_ADMIN"
NEEDED = ("bpf", "perf_event_open")
ARG_FIELDS = ("index", "value", "valueTwo", "op")


def applies(rule: dict[str, Any], caps: set[str], arch: str) -> bool:
    """Whether podman would keep `rule` for a container holding `caps` on
    `arch`: every `includes` condition met, no `excludes` one."""
    includes = rule.get("includes") or {}
    excludes = rule.get("excludes") or {}
    if any(c not in caps for c in includes.get("caps") or []):
        return False
    if any(c in caps for c in excludes.get("caps") or []):
        return False
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if arch in (excludes.get("arches") or []):
        return False
    # minKernel: the nodes' kernels are not known here; a rule for a newer
    # kernel's system call is harmless on an older one.
    return True


def convert(profile: dict[str, Any], caps: set[str], arch: str) -> dict[str, Any]:
    out: dict[str, Any] = {"defaultAction": profile["defaultAction"]}
    if "defaultErrnoRet" in profile:
        out["defaultErrnoRet"] = profile["defaultErrnoRet"]
    native = NATIVE.get(arch)
    architectures: list[str] = []
    for entry in profile.get("archMap") or []:
        if entry.get("architecture") == native:
            architectures = [native, *(entry.get("subArchitectures") or [])]
    if not architectures:
        architectures = list(profile.get("architectures") or ([native] if native else []))
    if architectures:
        out["architectures"] = architectures
    rules = []
    for rule in profile.get("syscalls") or []:
        if not applies(rule, caps, arch):
            continue
        names = list(rule.get("names") or ([rule["name"]] if "name" in rule else []))
        if not names:
            continue
        kept: dict[str, Any] = {"names": names, "action": rule["action"]}
        if rule.get("errnoRet") is not None:
            kept["errnoRet"] = rule["errnoRet"]
        args = [{k: a[k] for k in ARG_FIELDS if k in a} for a in rule.get("args") or []]
        if args:
            kept["args"] = args
        rules.append(kept)
    out["syscalls"] = resolve_conflicts(rules)
    return out


def resolve_conflicts(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A system call both allowed and refused without conditions (podman's
    own profile has such pairs, e.g. setns) is refused: which rule wins is
    up to the runtime otherwise. Reported on standard error."""
    actions: dict[str, set[str]] = {}
    for rule in rules:
        if not rule.get("args"):
            for name in rule["names"]:
                actions.setdefault(name, set()).add(rule["action"])
    conflicts = {n for n, a in actions.items() if len(a) > 1 and n not in NEEDED}
    if not conflicts:
        return rules
    print(f"seccomp-profile: allowed and refused in the source, refused here: {', '.join(sorted(conflicts))}",
          file=sys.stderr)
    kept = []
    for rule in rules:
        if not rule.get("args") and rule["action"] in ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG"):
            rule = dict(rule, names=[n for n in rule["names"] if n not in conflicts])
            if not rule["names"]:
                continue
        kept.append(rule)
    return kept


def problems(profile: dict[str, Any]) -> list[str]:
    """What makes `profile` unfit for the gateway."""
    found = []
    unconditional: dict[str, set[str]] = {}
    for rule in profile["syscalls"]:
        if not rule.get("args"):
            for name in rule["names"]:
                unconditional.setdefault(name, set()).add(rule["action"])
    for name, actions in sorted(unconditional.items()):
        if len(actions) > 1:
            found.append(f"{name} has conflicting rules: {sorted(actions)}")
    for name in NEEDED:
        if unconditional.get(name) != {"SCMP_ACT_ALLOW"}:
            found.append(f"{name} is not allowed unconditionally (is this the profile `cargo xtask image` writes?)")
    if profile["defaultAction"] == "SCMP_ACT_ALLOW":
        found.append("the default action allows everything: no profile at all")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", type=pathlib.Path,
                        default=pathlib.Path(__file__).resolve().parent.parent / "target/image/seccomp-loader.json")
    parser.add_argument("--arch", default=platform.machine(),
                        help="the nodes' architecture (Go name: amd64, arm64, ...); default: this machine's")
    parser.add_argument("--caps", default=GATEWAY_CAPS,
                        help=f"capabilities the containers may hold (default {GATEWAY_CAPS})")
    parser.add_argument("-o", "--output", type=pathlib.Path, help="write here instead of standard output")
    args = parser.parse_args()

    arch = GO_ARCH.get(args.arch, args.arch)
    caps = {"CAP_" + c.strip().upper().removeprefix("CAP_") for c in args.caps.split(",") if c.strip()}
    try:
        profile = json.loads(args.source.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"seccomp-profile: cannot read {args.source}: {e} (`cargo xtask image` writes it)", file=sys.stderr)
        return 1
    converted = convert(profile, caps, arch)
    found = problems(converted)
    if found:
        for problem in found:
            print(f"seccomp-profile: {args.source}: {problem}", file=sys.stderr)
        return 1
    text = json.dumps(converted, indent=2) + "\n"
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    print(f"seccomp-profile: {len(converted['syscalls'])} of {len(profile.get('syscalls') or [])} rules "
          f"apply on {arch} with {', '.join(sorted(caps))}; architectures "
          f"{', '.join(converted.get('architectures') or ['native'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

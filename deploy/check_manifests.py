#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests under deploy/.

Run by deploy/validate.sh inside the virtual environment that holds the
pinned kubernetes-validate. For every document of every manifest:

* strict schema validation against each Kubernetes version given (an
  unknown field, a wrong type or an unknown kind is an error; the
  kubernetes-validate command line only warns about an unknown kind);
* the DaemonSet's policy, container by container (loader, envoy,
  pod-sync, nothing else): every container drops ALL capabilities, the
  loader adds exactly CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN and the others
  add none; nothing is privileged or may escalate; the loader and pod-sync
  run as root, Envoy as the image's user 41053 and never as root; every
  container uses the node's seccomp profile dns-egress-gateway.json; the pod
  uses the host network, not the host's pid or IPC namespace, and is in
  Envoy's group; the loader and Envoy share the state directory (an
  emptyDir in memory) and the host's bpffs; the probes and commands are
  the ones the design needs;
* references between the objects (volumes, ConfigMap, ServiceAccount, RBAC,
  namespace), which a schema cannot see;
* the embedded gateway.toml parses as TOML and agrees with the DaemonSet
  (kubepods root, pin directory, metrics port, nothing gated statically).

A PATH is a manifest file or a directory with a kustomization.yaml (its
`resources`, each of which must exist, and every manifest in the
directory must be listed). --extract DIR writes each shell container's
script as DIR/<container>.sh and the configuration as DIR/gateway.toml, for
the behaviour tests in validate.sh. --self-test breaks copies of the
documents in known ways and fails unless each break is reported, and
reported for its own reason.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import pathlib
import re
import sys
import tomllib
from typing import Any, Callable

import yaml
from kubernetes_validate import utils as kv

# What each container adds to an empty capability set, nothing more.
CAPABILITIES = {
    "loader": {"BPF", "PERFMON", "NET_ADMIN"},
    "envoy": set(),
    "pod-sync": set(),
}
ROOT_CONTAINERS = {"loader", "pod-sync"}
# Envoy's user and group in the image (deploy/container/Containerfile).
ENVOY_USER = "dns-gateway-envoy"
ENVOY_ID = 41053
CONTAINERFILE = pathlib.Path(__file__).resolve().parent / "container" / "Containerfile"
# The node's seccomp profile (the runtime default plus bpf and
# perf_event_open), below the kubelet's seccomp directory.
SECCOMP_PROFILE = "dns-egress-gateway.json"
# Containers that create, change or lock files below /sys/fs/bpf, which the
# runtimes' default AppArmor profile forbids.
APPARMOR_UNCONFINED = {"loader", "envoy"}
# Where the gateway expects the host's hierarchies (it reads the cgroup2
# mount point from /proc/self/mounts; pin_dir must be below bpffs).
CGROUP_MOUNT = "/sys/fs/cgroup"
BPFFS_MOUNT = "/sys/fs/bpf"
# The default --state-dir of run, envoy-exec, status and reload.
STATE_DIR = "/run/dns-egress-gateway"
CONFIG_KEY = "gateway.toml"
GATE_LABEL = "dns-egress-gateway.io/gate"
METRICS_PATH = "/stats/prometheus"
# Provided by the cluster in every namespace, not by these manifests.
CLUSTER_CONFIGMAPS = {"kube-root-ca.crt"}
SHELL = ["/bin/sh", "-c"]

Doc = dict[str, Any]


def load_path(path: pathlib.Path, errors: list[str]) -> list[tuple[str, Doc]]:
    """The documents of a manifest file, or of a kustomization directory."""
    if path.is_dir():
        kustomization = path / "kustomization.yaml"
        if not kustomization.is_file():
            errors.append(f"{path}: a directory needs a kustomization.yaml")
            return []
        listed = yaml.safe_load(kustomization.read_text()).get("resources") or []
        on_disk = {
            p.name
            for p in path.iterdir()
            if p.suffix in (".yaml", ".yml", ".json") and p.name != kustomization.name
        }
        for name in sorted(on_disk - set(listed)):
            errors.append(f"{path / name}: not listed in {kustomization}")
        docs: list[tuple[str, Doc]] = []
        for name in listed:
            if not (path / name).is_file():
                errors.append(f"{kustomization}: resource {name} does not exist")
                continue
            docs.extend(load_path(path / name, errors))
        return docs
    try:
        loaded = list(yaml.safe_load_all(path.read_text()))
    except yaml.YAMLError as e:
        errors.append(f"{path}: not YAML: {e}")
        return []
    docs = []
    for i, doc in enumerate(loaded):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            errors.append(f"{path}: document {i} is not a mapping")
            continue
        docs.append((str(path), doc))
    return docs


def name_of(doc: Doc) -> str:
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind', '?')}/{meta.get('name', '?')}"


# kubernetes-validate reads and parses its schema files (megabytes of JSON)
# on every call; the self-test validates dozens of variants. Both the
# files and each document's outcome are kept.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)
kv.all_versions = functools.lru_cache(maxsize=None)(kv.all_versions)


def check_schema(docs: list[tuple[str, Doc]], versions: list[str]) -> list[str]:
    errors = []
    for origin, doc in docs:
        if not {"apiVersion", "kind"} <= doc.keys():
            errors.append(f"{origin}: {name_of(doc)}: apiVersion and kind are required")
            continue
        errors += schema_errors(origin, json.dumps(doc, sort_keys=True, default=str), tuple(versions))
    return errors


@functools.lru_cache(maxsize=None)
def schema_errors(origin: str, text: str, versions: tuple[str, ...]) -> list[str]:
    """The schema errors of one document (as canonical JSON)."""
    doc = json.loads(text)
    errors = []
    for version in versions:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path) or "(top)"
            errors.append(f"{origin}: {name_of(doc)} (Kubernetes {version}): {where}: {e.message}")
        except (kv.SchemaNotFoundError, kv.VersionNotSupportedError, kv.InvalidSchemaError) as e:
            errors.append(f"{origin}: {name_of(doc)} (Kubernetes {version}): {e.message}")
        except Exception as e:  # a checker failure is a failure too
            errors.append(f"{origin}: {name_of(doc)} (Kubernetes {version}): cannot validate: {e}")
    return errors


def by_kind(docs: list[tuple[str, Doc]], kind: str) -> list[Doc]:
    return [d for _, d in docs if d.get("kind") == kind]


def env_of(container: Doc) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env") or [] if "name" in e}


def gateway_config(docs: list[tuple[str, Doc]], errors: list[str]) -> dict[str, dict[str, Any] | None]:
    """The parsed gateway.toml of every ConfigMap that carries one (None:
    not TOML, reported here)."""
    configs = {}
    for cm in by_kind(docs, "ConfigMap"):
        text = (cm.get("data") or {}).get(CONFIG_KEY)
        if text is None:
            continue
        try:
            configs[cm["metadata"]["name"]] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            configs[cm["metadata"]["name"]] = None
            errors.append(f"{name_of(cm)}: {CONFIG_KEY} is not valid TOML: {e}")
    return configs


def image_envoy_id() -> int | None:
    """ENVOY_ID as the Containerfile sets it, None if it cannot be read."""
    try:
        text = CONTAINERFILE.read_text()
    except OSError:
        return None
    match = re.search(r"^ARG ENVOY_ID=(\d+)\s*$", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def is_below(path: str, parent: str) -> bool:
    """True when `path` is `parent` or below it."""
    return pathlib.PurePosixPath(path).is_relative_to(pathlib.PurePosixPath(parent))


def check_daemonset(ds: Doc, docs: list[tuple[str, Doc]], configs: dict[str, dict[str, Any] | None]) -> list[str]:
    errors: list[str] = []
    where = name_of(ds)

    def fail(message: str) -> None:
        errors.append(f"{where}: {message}")

    spec = ds.get("spec") or {}
    template = spec.get("template") or {}
    labels = (template.get("metadata") or {}).get("labels") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    pod = template.get("spec") or {}

    # --- the pod -------------------------------------------------------------
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        fail("spec.selector.matchLabels must be non-empty and match the template's labels")
    if GATE_LABEL in labels:
        fail(f"the gateway's own pods must not carry {GATE_LABEL} (they would gate themselves)")
    if pod.get("hostNetwork") is not True:
        fail("hostNetwork must be true: the kernel redirects only sockets of Envoy's network namespace")
    if pod.get("dnsPolicy") != "ClusterFirstWithHostNet":
        fail("dnsPolicy must be ClusterFirstWithHostNet (the cluster DNS is the fallback resolver)")
    for field in ("hostPID", "hostIPC"):
        if pod.get(field):
            fail(f"{field} must not be set")
    strategy = spec.get("updateStrategy") or {}
    rolling = strategy.get("rollingUpdate") or {}
    if strategy.get("type") != "RollingUpdate" or rolling.get("maxUnavailable") != 1:
        fail("updateStrategy must be RollingUpdate with maxUnavailable 1")
    if rolling.get("maxSurge") not in (None, 0, "0", "0%"):
        fail("no maxSurge: two gateways cannot share a node (one pin directory, fixed ports)")
    if pod.get("priorityClassName") != "system-node-critical":
        fail("priorityClassName must be system-node-critical")
    if not any(t.get("operator") == "Exists" and "key" not in t for t in pod.get("tolerations") or []):
        fail("a toleration with operator Exists and no key is needed to run on every node")
    pod_security = pod.get("securityContext") or {}
    if pod_security.get("sysctls"):
        fail("no sysctls")
    image_id = image_envoy_id()
    if image_id is None:
        fail(f"cannot read ARG ENVOY_ID from {CONTAINERFILE}")
    elif image_id != ENVOY_ID:
        fail(f"the image's Envoy user is {image_id} ({CONTAINERFILE}), the manifests use {ENVOY_ID}")
    if ENVOY_ID not in (pod_security.get("supplementalGroups") or []):
        fail(f"securityContext.supplementalGroups must hold {ENVOY_ID}, Envoy's group: "
             f"`gateway run --external-envoy` shares its files through it")

    # --- volumes -------------------------------------------------------------
    volumes = {v["name"]: v for v in pod.get("volumes") or [] if "name" in v}
    host_paths = {v["hostPath"]["path"]: name for name, v in volumes.items() if "hostPath" in v}
    for needed in (CGROUP_MOUNT, BPFFS_MOUNT):
        if needed not in host_paths:
            fail(f"a hostPath volume of {needed} is required")
    extra = set(host_paths) - {CGROUP_MOUNT, BPFFS_MOUNT}
    if extra:
        fail(f"hostPath volumes other than the cgroup2 and bpffs mounts: {sorted(extra)}")

    configmaps = {cm["metadata"]["name"] for cm in by_kind(docs, "ConfigMap")} | CLUSTER_CONFIGMAPS
    for name, volume in volumes.items():
        refs = []
        if "configMap" in volume:
            refs.append(volume["configMap"].get("name"))
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "configMap" in source:
                refs.append(source["configMap"].get("name"))
        for ref in refs:
            if ref not in configmaps:
                fail(f"volume {name} refers to ConfigMap {ref}, which is not defined here")

    accounts = {sa["metadata"]["name"] for sa in by_kind(docs, "ServiceAccount")}
    if pod.get("serviceAccountName") not in accounts:
        fail(f"serviceAccountName {pod.get('serviceAccountName')} is not defined here")

    # --- every container -------------------------------------------------------
    containers = pod.get("containers") or []
    by_name = {c.get("name"): c for c in containers}
    for kind in ("initContainers", "ephemeralContainers"):
        if pod.get(kind):
            fail(f"no {kind}: each container's privileges are checked by name")
    for c in containers:
        if c.get("name") not in CAPABILITIES:
            fail(f"unexpected container {c.get('name')}: expected exactly {sorted(CAPABILITIES)}")
    for name in CAPABILITIES:
        if name not in by_name:
            fail(f"no container named {name}")

    def mounts_of(c: Doc) -> dict[str, Doc]:
        return {m.get("mountPath"): m for m in c.get("volumeMounts") or []}

    def config_file(c: Doc, path: str | None) -> tuple[str | None, Doc | None]:
        """The ConfigMap volume `path` is in, for container `c`."""
        if not path:
            return None, None
        for mount_path, m in mounts_of(c).items():
            volume = volumes.get(m.get("name")) or {}
            if "configMap" in volume and is_below(path, mount_path):
                return volume["configMap"].get("name"), volume["configMap"]
        fail(f"container {c.get('name')}: {path} is not in a mounted ConfigMap")
        return None, None

    config_paths: dict[str, str] = {}
    config_maps: dict[str, str | None] = {}
    for c in containers:
        cname = c.get("name", "?")
        sc = c.get("securityContext") or {}
        caps = sc.get("capabilities") or {}
        drop = caps.get("drop") or []
        add = [a.upper().removeprefix("CAP_") for a in caps.get("add") or []]
        if drop != ["ALL"]:
            fail(f"container {cname}: capabilities.drop must be exactly [ALL], not {drop}")
        expected = CAPABILITIES.get(cname, set())
        if len(add) != len(set(add)) or set(add) != expected:
            fail(f"container {cname}: capabilities.add must be exactly {sorted(expected)}, not {add}")
        if sc.get("privileged") is not False:
            fail(f"container {cname}: privileged must be false")
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(f"container {cname}: allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            fail(f"container {cname}: readOnlyRootFilesystem must be true")
        if cname in ROOT_CONTAINERS and sc.get("runAsUser") != 0:
            fail(f"container {cname}: runAsUser must be 0 (the pins and the state directory are root's)")
        seccomp = sc.get("seccompProfile") or {}
        if seccomp.get("type") != "Localhost" or seccomp.get("localhostProfile") != SECCOMP_PROFILE:
            fail(f"container {cname}: seccompProfile must be Localhost {SECCOMP_PROFILE} "
                 f"(the runtime's default refuses bpf() without CAP_SYS_ADMIN), not {seccomp}")
        apparmor = (sc.get("appArmorProfile") or {}).get("type")
        if cname in APPARMOR_UNCONFINED and apparmor != "Unconfined":
            fail(f"container {cname}: appArmorProfile must be Unconfined (the default profile "
                 f"forbids changing files below {BPFFS_MOUNT}), not {apparmor}")
        resources = c.get("resources") or {}
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= (resources.get(kind) or {}).keys():
                fail(f"container {cname}: resources.{kind} needs cpu and memory")

        mounts = mounts_of(c)
        for m in mounts.values():
            if m.get("name") not in volumes:
                fail(f"container {cname}: volumeMount {m.get('name')} has no volume")
            if m.get("mountPropagation") == "Bidirectional":
                fail(f"container {cname}: Bidirectional propagation needs a privileged container")
        # Everyone needs the pins; Envoy needs no cgroup.
        needed = [BPFFS_MOUNT] if cname == "envoy" else [CGROUP_MOUNT, BPFFS_MOUNT]
        for host_path in needed:
            m = mounts.get(host_path)
            if m is None or m.get("name") != host_paths.get(host_path):
                fail(f"container {cname}: the host's {host_path} must be mounted at {host_path}")
        if cname == "envoy" and CGROUP_MOUNT in mounts:
            fail(f"container envoy: no {CGROUP_MOUNT} mount (Envoy needs none)")
        cgroup = mounts.get(CGROUP_MOUNT)
        if cgroup is not None and cgroup.get("readOnly") is not True:
            fail(f"container {cname}: {CGROUP_MOUNT} must be mounted read-only")
        bpffs = mounts.get(BPFFS_MOUNT)
        if bpffs is not None:
            if bpffs.get("readOnly"):
                fail(f"container {cname}: {BPFFS_MOUNT} must be writable (pins; the kernel "
                     f"checks their file permissions on every open)")
            if bpffs.get("mountPropagation") != "HostToContainer":
                fail(f"container {cname}: {BPFFS_MOUNT} needs mountPropagation HostToContainer")

        env = env_of(c)
        if "CONFIG" in env:
            config_paths[cname] = env["CONFIG"]
            config_maps[cname] = config_file(c, env["CONFIG"])[0]
        if "GATE_SELECTOR" in env:
            key = env["GATE_SELECTOR"].split("=", 1)[0]
            if key != GATE_LABEL:
                fail(f"container {cname}: GATE_SELECTOR selects {key}, documented as {GATE_LABEL}")

    # --- the state directory: one emptyDir, loader and Envoy ------------------
    state_mounts = {}
    for cname in ("loader", "envoy"):
        c = by_name.get(cname)
        if c is None:
            continue
        found = [(path, m) for path, m in mounts_of(c).items() if path and is_below(STATE_DIR, path)]
        if not found:
            fail(f"container {cname}: the state directory {STATE_DIR} must be on the shared volume")
            continue
        path, m = max(found, key=lambda pm: len(pm[0]))
        state_mounts[cname] = (path, m.get("name"))
        volume = volumes.get(m.get("name")) or {}
        if (volume.get("emptyDir") or {}).get("medium") != "Memory":
            fail(f"container {cname}: {path} must be an emptyDir with medium Memory "
                 f"(the bootstrap holds tokens), not {volume}")
        if path == STATE_DIR:
            fail(f"container {cname}: mount the shared emptyDir above {STATE_DIR} (e.g. /run): its root "
                 f"is world-writable, which the loader refuses for its state directory")
    if len(state_mounts) == 2 and state_mounts["loader"] != state_mounts["envoy"]:
        fail(f"loader and envoy must mount the same volume at the same path for {STATE_DIR}: "
             f"{state_mounts}")
    c = by_name.get("pod-sync")
    if c is not None and any(m.get("name") == state_mounts.get("loader", (None, None))[1]
                             for m in c.get("volumeMounts") or []):
        fail("container pod-sync: no access to the state directory (it holds the tokens)")

    # --- loader ----------------------------------------------------------------
    config: dict[str, Any] = {}
    loader = by_name.get("loader")
    if loader is not None:
        config_path = config_paths.get("loader")
        if config_path is None:
            fail("container loader: CONFIG (the configuration's path) must be set")
        cm_name = config_maps.get("loader")
        config = configs.get(cm_name or "") or {}
        if cm_name not in configs:
            fail(f"no {CONFIG_KEY} in the ConfigMap mounted for the loader")
        script = " ".join(loader.get("args") or [])
        flat = re.sub(r"\\\n\s*", " ", script)
        for part in ("gateway run --config", f"--envoy-user {ENVOY_USER}", "--external-envoy", "--keep-attached"):
            if part not in flat:
                fail(f"container loader must run `gateway run --envoy-user {ENVOY_USER} "
                     f"--external-envoy --keep-attached` (missing {part})")
        if "KILL" in script:
            fail("container loader: no SIGKILL (--keep-attached leaves the programs attached on SIGTERM)")
        command = ((loader.get("readinessProbe") or {}).get("exec") or {}).get("command") or []
        if [pathlib.PurePosixPath(c).name for c in command[:1]] + command[1:3] != ["gateway", "status", "--check"] \
                or "--config" not in command or \
                command[command.index("--config") + 1:][:1] != [config_path]:
            fail(f"container loader: readinessProbe must run `gateway status --check --config {config_path}`")

    # --- envoy -----------------------------------------------------------------
    envoy = by_name.get("envoy")
    metrics_host: str | None = None
    metrics_port: str | None = None
    metrics = (config.get("listeners") or {}).get("metrics") if config else None
    if metrics:
        metrics_host, metrics_port = str(metrics).rsplit(":", 1)
    if envoy is not None:
        sc = envoy.get("securityContext") or {}
        if sc.get("runAsUser") != ENVOY_ID or sc.get("runAsGroup") != ENVOY_ID:
            fail(f"container envoy: runAsUser and runAsGroup must be {ENVOY_ID} ({ENVOY_USER})")
        if sc.get("runAsNonRoot") is not True:
            fail("container envoy: runAsNonRoot must be true")
        argv = (envoy.get("command") or []) + (envoy.get("args") or [])
        if not argv or pathlib.PurePosixPath(argv[0]).name != "gateway" or argv[1:2] != ["envoy-exec"] \
                or "--config" not in argv:
            fail(f"container envoy must run `gateway envoy-exec --config …`, not {argv}")
        else:
            path = (argv[argv.index("--config") + 1:] or [None])[0]
            cm_name, volume = config_file(envoy, path)
            loader_path = config_paths.get("loader")
            if path != loader_path:
                fail(f"container envoy: --config {path} differs from the loader's {loader_path}")
            if volume is not None:
                mode = volume.get("defaultMode", 0o644)
                if not mode & 0o004:
                    fail(f"container envoy: its ConfigMap volume's defaultMode {mode:o} does not let "
                         f"user {ENVOY_ID} read {CONFIG_KEY} (the files are root's)")
            if "--state-dir" in argv:
                fail("container envoy: the state directory must be the default, as the loader's")
        ports = {p.get("name"): p for p in envoy.get("ports") or []}
        for probe in ("startupProbe", "livenessProbe"):
            get = (envoy.get(probe) or {}).get("httpGet")
            if get is None:
                fail(f"container envoy: {probe} must be an httpGet of {METRICS_PATH} on the metrics listener")
                continue
            port = get.get("port")
            port = str((ports.get(port) or {}).get("containerPort", port))
            if get.get("path") != METRICS_PATH or port != metrics_port:
                fail(f"container envoy: {probe} must get {METRICS_PATH} on the metrics listener's port "
                     f"{metrics_port}, not {get.get('path')} on {port}")
            elif get.get("host") not in (None, metrics_host) and metrics_host != "0.0.0.0":
                fail(f"container envoy: {probe} connects to {get.get('host')}, the metrics listener is on {metrics_host}")
            elif get.get("host") is None and metrics_host != "0.0.0.0":
                fail(f"container envoy: {probe} connects to the pod IP, the metrics listener is on {metrics_host}")
        declared = {str(p.get("containerPort")) for p in ports.values()}
        if metrics_port is not None and metrics_port not in declared:
            fail(f"container envoy: the metrics port {metrics_port} is not declared as a container port")
        if annotations.get("prometheus.io/port") != metrics_port:
            fail(f"prometheus.io/port must be the metrics listener's port {metrics_port}")

    # --- pod-sync and the configuration -------------------------------------------
    sync = by_name.get("pod-sync")
    if sync is not None:
        env = env_of(sync)
        script = " ".join(sync.get("args") or [])
        if "gateway gate-pods" not in script:
            fail("container pod-sync must run `gateway gate-pods`")
        if config_paths.get("pod-sync") != config_paths.get("loader"):
            fail("container pod-sync: CONFIG must be the loader's")
        if "KUBEPODS_ROOT" in env and "cgroup" in config:
            expected = str(pathlib.PurePosixPath(CGROUP_MOUNT) / str(config["cgroup"]).lstrip("/"))
            if env["KUBEPODS_ROOT"].rstrip("/") != expected:
                fail(f"container pod-sync: KUBEPODS_ROOT {env['KUBEPODS_ROOT']} is not the "
                     f"configuration's cgroup ({expected})")
        if not {"GATE_SELECTOR", "KUBEPODS_ROOT", "NODE_NAME"} <= env.keys():
            fail("container pod-sync: GATE_SELECTOR, KUBEPODS_ROOT and NODE_NAME must be set")
    if config:
        if not str(config.get("pin_dir", "")).startswith(BPFFS_MOUNT + "/"):
            fail(f"{CONFIG_KEY}: pin_dir must be below {BPFFS_MOUNT}")
        if config.get("gate") != []:
            fail(f"{CONFIG_KEY}: gate must be [] (pod-sync gates the labelled pods)")
        if not metrics:
            fail(f"{CONFIG_KEY}: listeners.metrics is needed (scraping, and the envoy container's probes)")
    return errors


def check_objects(docs: list[tuple[str, Doc]]) -> list[str]:
    errors: list[str] = []
    namespaces = {ns["metadata"]["name"] for ns in by_kind(docs, "Namespace")}
    cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
    for origin, doc in docs:
        if doc.get("kind") in cluster_scoped:
            continue
        ns = (doc.get("metadata") or {}).get("namespace")
        if ns not in namespaces:
            errors.append(f"{origin}: {name_of(doc)}: namespace {ns} is not one defined here")
    roles = {r["metadata"]["name"]: r for r in by_kind(docs, "ClusterRole")}
    accounts = {(sa["metadata"]["name"], sa["metadata"].get("namespace")) for sa in by_kind(docs, "ServiceAccount")}
    for role in roles.values():
        for rule in role.get("rules") or []:
            if rule.get("apiGroups") != [""] or rule.get("resources") != ["pods"] or \
                    set(rule.get("verbs") or []) - {"list", "watch"}:
                errors.append(f"{name_of(role)}: only list and watch on pods are needed, not {rule}")
    for binding in by_kind(docs, "ClusterRoleBinding"):
        if binding.get("roleRef", {}).get("name") not in roles:
            errors.append(f"{name_of(binding)}: roleRef names no ClusterRole defined here")
        for s in binding.get("subjects") or []:
            if s.get("kind") == "ServiceAccount" and (s.get("name"), s.get("namespace")) not in accounts:
                errors.append(f"{name_of(binding)}: subject {s} is not a ServiceAccount defined here")
    return errors


def check_all(docs: list[tuple[str, Doc]], versions: list[str]) -> list[str]:
    errors = check_schema(docs, versions)
    configs = gateway_config(docs, errors)
    for ds in by_kind(docs, "DaemonSet"):
        errors += check_daemonset(ds, docs, configs)
    errors += check_objects(docs)
    if not by_kind(docs, "DaemonSet"):
        errors.append("no DaemonSet among the manifests")
    return errors


def extract(docs: list[tuple[str, Doc]], directory: pathlib.Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for ds in by_kind(docs, "DaemonSet"):
        for c in ds["spec"]["template"]["spec"]["containers"]:
            if c.get("command") == SHELL and len(c.get("args") or []) == 1:
                (directory / f"{c['name']}.sh").write_text(c["args"][0])
    for cm in by_kind(docs, "ConfigMap"):
        text = (cm.get("data") or {}).get(CONFIG_KEY)
        if text is not None:
            (directory / CONFIG_KEY).write_text(text)


def self_test(docs: list[tuple[str, Doc]], versions: list[str]) -> list[str]:
    """Breaks copies of the documents; each break must be reported, by an
    error that contains the expected text (so that an unrelated error
    cannot pass for it)."""

    def daemonset(d: list[tuple[str, Doc]]) -> Doc:
        return by_kind(d, "DaemonSet")[0]

    def pod(d: list[tuple[str, Doc]]) -> Doc:
        return daemonset(d)["spec"]["template"]["spec"]

    def container(d: list[tuple[str, Doc]], name: str) -> Doc:
        return next(c for c in pod(d)["containers"] if c["name"] == name)

    def security(d: list[tuple[str, Doc]], name: str) -> Doc:
        return container(d, name)["securityContext"]

    def mount(d: list[tuple[str, Doc]], name: str, path: str) -> Doc:
        return next(m for m in container(d, name)["volumeMounts"] if m["mountPath"] == path)

    def volume(d: list[tuple[str, Doc]], name: str) -> Doc:
        return next(v for v in pod(d)["volumes"] if v["name"] == name)

    def configmap(d: list[tuple[str, Doc]]) -> Doc:
        return next(cm for cm in by_kind(d, "ConfigMap") if CONFIG_KEY in (cm.get("data") or {}))

    def edit_config(d: list[tuple[str, Doc]], old: str, new: str) -> None:
        data = configmap(d)["data"]
        assert old in data[CONFIG_KEY], old
        data[CONFIG_KEY] = data[CONFIG_KEY].replace(old, new)

    def edit_script(d: list[tuple[str, Doc]], name: str, old: str, new: str) -> None:
        args = container(d, name)["args"]
        assert old in args[0], old
        args[0] = args[0].replace(old, new)

    def rename(mapping: Doc, old: str, new: str) -> None:
        mapping[new] = mapping.pop(old)

    Mutation = Callable[[list[tuple[str, Doc]]], None]
    breaks: list[tuple[str, str, Mutation]] = [
        # The schema.
        ("a misspelled field (mountPropogation)", "'mountPropogation' was unexpected",
         lambda d: rename(mount(d, "envoy", BPFFS_MOUNT), "mountPropagation", "mountPropogation")),
        ("a misspelled field in a probe (periodSecond)", "'periodSecond' was unexpected",
         lambda d: rename(container(d, "loader")["readinessProbe"], "periodSeconds", "periodSecond")),
        ("a wrong type (runAsUser: \"41053\")", "runAsUser: '41053' is not of type",
         lambda d: security(d, "envoy").__setitem__("runAsUser", str(ENVOY_ID))),
        ("a wrong type (containerPort: metrics)", "containerPort: 'metrics' is not of type",
         lambda d: container(d, "envoy")["ports"][0].__setitem__("containerPort", "metrics")),
        ("an unknown kind (DeamonSet)", "Couldn't find schema for kind DeamonSet",
         lambda d: daemonset(d).__setitem__("kind", "DeamonSet")),
        # Capabilities.
        ("a capability too many for the loader (SYS_ADMIN)", "container loader: capabilities.add must be exactly",
         lambda d: security(d, "loader")["capabilities"]["add"].append("SYS_ADMIN")),
        ("a capability missing for the loader (PERFMON)", "container loader: capabilities.add must be exactly",
         lambda d: security(d, "loader")["capabilities"]["add"].remove("PERFMON")),
        ("a capability for Envoy (BPF)", "container envoy: capabilities.add must be exactly []",
         lambda d: security(d, "envoy")["capabilities"].__setitem__("add", ["BPF"])),
        ("a capability for pod-sync (CAP_NET_ADMIN)", "container pod-sync: capabilities.add must be exactly []",
         lambda d: security(d, "pod-sync")["capabilities"].__setitem__("add", ["CAP_NET_ADMIN"])),
        ("Envoy's capabilities not dropped", "container envoy: capabilities.drop must be exactly [ALL]",
         lambda d: security(d, "envoy")["capabilities"].__setitem__("drop", ["NET_RAW"])),
        # Privilege.
        ("a privileged pod-sync", "container pod-sync: privileged must be false",
         lambda d: security(d, "pod-sync").__setitem__("privileged", True)),
        ("privilege escalation for Envoy", "container envoy: allowPrivilegeEscalation must be false",
         lambda d: security(d, "envoy").__setitem__("allowPrivilegeEscalation", True)),
        ("a writable root file system", "container loader: readOnlyRootFilesystem must be true",
         lambda d: security(d, "loader").__setitem__("readOnlyRootFilesystem", False)),
        ("Envoy as root", "container envoy: runAsUser and runAsGroup must be",
         lambda d: security(d, "envoy").__setitem__("runAsUser", 0)),
        ("Envoy without runAsNonRoot", "container envoy: runAsNonRoot must be true",
         lambda d: security(d, "envoy").pop("runAsNonRoot")),
        ("hostPID", "hostPID must not be set",
         lambda d: pod(d).__setitem__("hostPID", True)),
        ("no host network", "hostNetwork must be true",
         lambda d: pod(d).__setitem__("hostNetwork", False)),
        ("the runtime's default seccomp profile", "container loader: seccompProfile must be Localhost",
         lambda d: security(d, "loader").__setitem__("seccompProfile", {"type": "RuntimeDefault"})),
        ("another Localhost seccomp profile", "container pod-sync: seccompProfile must be Localhost",
         lambda d: security(d, "pod-sync")["seccompProfile"].__setitem__("localhostProfile", "other.json")),
        ("the default AppArmor profile for the loader", "container loader: appArmorProfile must be Unconfined",
         lambda d: security(d, "loader").pop("appArmorProfile")),
        # The two-container design.
        ("Envoy's group not in the pod", "supplementalGroups must hold",
         lambda d: pod(d)["securityContext"].pop("supplementalGroups")),
        ("the loader without --keep-attached", "missing --keep-attached",
         lambda d: edit_script(d, "loader", "--keep-attached", "")),
        ("the loader without --external-envoy", "missing --external-envoy",
         lambda d: edit_script(d, "loader", "--external-envoy", "")),
        ("the loader's old SIGKILL trick", "container loader: no SIGKILL",
         lambda d: edit_script(d, "loader", "kill -TERM", "kill -KILL")),
        ("Envoy running gateway run", "container envoy must run `gateway envoy-exec",
         lambda d: container(d, "envoy")["args"].__setitem__(0, "run")),
        ("Envoy on another state directory", "the state directory /run/dns-egress-gateway must be on the shared volume",
         lambda d: mount(d, "envoy", "/run").__setitem__("mountPath", "/var/run/gw")),
        ("the shared volume at the state directory itself", "its root is world-writable",
         lambda d: [mount(d, c, "/run").__setitem__("mountPath", STATE_DIR) for c in ("loader", "envoy")]),
        ("the state directory on disk", "must be an emptyDir with medium Memory",
         lambda d: volume(d, "run")["emptyDir"].pop("medium")),
        ("Envoy's configuration unreadable by its user", "does not let user 41053 read",
         lambda d: volume(d, "config-envoy")["configMap"].__setitem__("defaultMode", 0o400)),
        ("a cgroup mount for Envoy", "container envoy: no /sys/fs/cgroup mount",
         lambda d: container(d, "envoy")["volumeMounts"].append(
             {"name": "cgroup", "mountPath": CGROUP_MOUNT, "readOnly": True})),
        ("a read-only bpffs for Envoy", "container envoy: /sys/fs/bpf must be writable",
         lambda d: mount(d, "envoy", BPFFS_MOUNT).__setitem__("readOnly", True)),
        ("a fourth container", "unexpected container debug",
         lambda d: pod(d)["containers"].append(dict(copy.deepcopy(container(d, "pod-sync")), name="debug"))),
        # Probes and ports.
        ("no liveness probe for Envoy", "container envoy: livenessProbe must be an httpGet",
         lambda d: container(d, "envoy").pop("livenessProbe")),
        ("the loader's probe without --config", "readinessProbe must run `gateway status --check --config",
         lambda d: container(d, "loader")["readinessProbe"]["exec"].__setitem__(
             "command", ["/usr/local/bin/gateway", "status", "--check"])),
        ("the metrics listener moved", "the metrics listener's port 15091",
         lambda d: edit_config(d, 'metrics = "0.0.0.0:15090"', 'metrics = "0.0.0.0:15091"')),
        ("the metrics listener on loopback", "the metrics listener is on 127.0.0.1",
         lambda d: edit_config(d, 'metrics = "0.0.0.0:15090"', 'metrics = "127.0.0.1:15090"')),
        # The configuration.
        ("unparseable gateway.toml", "gateway.toml is not valid TOML",
         lambda d: edit_config(d, "ttl = 300", 'ttl = "unterminated')),
        ("a static gate list", "gate must be []",
         lambda d: edit_config(d, "gate = []", 'gate = ["app"]')),
        ("pod-sync on another kubepods root", "KUBEPODS_ROOT /sys/fs/cgroup/kubepods is not",
         lambda d: next(e for e in container(d, "pod-sync")["env"] if e["name"] == "KUBEPODS_ROOT")
         .__setitem__("value", "/sys/fs/cgroup/kubepods")),
        ("a volume mount without volume", "volumeMount konfig has no volume",
         lambda d: mount(d, "loader", "/etc/dns-egress-gateway").__setitem__("name", "konfig")),
    ]
    failures = []
    for what, expected, mutate in breaks:
        broken = copy.deepcopy(docs)
        try:
            mutate(broken)
        except (StopIteration, KeyError, IndexError, AssertionError) as e:
            failures.append(f"self-test: {what}: the mutation no longer applies ({e!r}); update it")
            continue
        found = check_all(broken, versions)
        hit = next((f for f in found if expected in f), None)
        if hit:
            print(f"self-test: {what}: caught: {hit}")
        elif found:
            failures.append(f"self-test: {what}: reported, but not as expected ({expected!r}): {found}")
        else:
            failures.append(f"self-test: {what} was NOT caught")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", "--kubernetes-version", action="append", required=True,
                        help="Kubernetes version to validate against (repeatable)")
    parser.add_argument("--extract", type=pathlib.Path, help="write the containers' scripts and gateway.toml here")
    parser.add_argument("--self-test", action="store_true", help="also check that known breaks are caught")
    parser.add_argument("paths", nargs="+", type=pathlib.Path)
    args = parser.parse_args()

    errors: list[str] = []
    docs: list[tuple[str, Doc]] = []
    for path in args.paths:
        docs.extend(load_path(path, errors))
    errors += check_all(docs, args.kubernetes_version)
    for error in errors:
        print(f"ERROR {error}")
    if errors:
        return 1
    versions = ", ".join(args.kubernetes_version)
    print(f"OK {len(docs)} objects ({', '.join(name_of(d) for _, d in docs)}) "
          f"valid against Kubernetes {versions} (strict), policy and references checked")
    if args.extract:
        extract(docs, args.extract)
    if args.self_test:
        failures = self_test(docs, args.kubernetes_version)
        for failure in failures:
            print(f"ERROR {failure}")
        if failures:
            return 1
        print("self-test: every break caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())

# Checks that docker-compose.yml matches the code and the repository: real settings, consistent ports, existing mounted files.
"""Check docker-compose.yml against what the code and the repository have, without a container engine.

Usage:
    python3 .ci/check-compose.py [docker-compose.yml]        # needs PyYAML (pip install pyyaml)
    python3 .ci/check-compose.py docker-compose.cluster.yml  # the JetStream topology: its own checks (check_cluster)

Checks, each printed with its outcome:
  - every INGEST_* / DATABASE_URL variable set in the compose file or the Dockerfile is a setting of
    src/config.rs (an `env = "..."` there);
  - the gateway is built from an existing Dockerfile; its DATABASE_URL names the postgres service, its port, user,
    password and database; it listens (INGEST_LISTEN) on every interface of the container, on the port it
    publishes, the Dockerfile EXPOSEs, the HEALTHCHECK asks and Prometheus scrapes; its data directory
    (INGEST_DATA_DIR, where the write-ahead log lives) is on a volume; the HEALTHCHECK asks /healthz, a route of
    src/http/mod.rs; the image needs API keys, and a gateway listening beyond loopback has them or says
    INGEST_ALLOW_ANONYMOUS=true;
  - every bind-mounted file or directory exists in the repository, and every named volume is declared;
  - Prometheus reads the mounted prometheus/prometheus.yml, whose rule files are mounted too, whose scrape job is
    the one the alerts select, and whose targets are compose services on the ports they listen on;
  - Grafana's provisioning is mounted where Grafana reads it, the dashboard provider's path is the mounted
    dashboards directory (which holds the dashboard), and the data source URL is the prometheus service on its port,
    with the scrape interval as its timeInterval;
  - every published port is one its service listens on.

Exit status: 0 all checks pass, 1 a check fails, 2 bad input (missing file, not YAML, no PyYAML).
"""

import posixpath
import re
import sys
import urllib.parse
from pathlib import Path

try:
    import yaml
except ImportError:
    print("error: PyYAML is required (pip install pyyaml)", file=sys.stderr)
    sys.exit(2)

ROOT = Path(__file__).resolve().parent.parent
# The service names the rest of this check (and the configuration files) rely on.
POSTGRES, GATEWAY, PROMETHEUS, GRAFANA = "postgres", "gateway", "prometheus", "grafana"
PROMETHEUS_CONFIG_DEFAULT = "/etc/prometheus/prometheus.yml"
GRAFANA_PROVISIONING_DEFAULT = "/etc/grafana/provisioning"


class Checks:
    """Collects named checks and prints each with its outcome."""

    def __init__(self):
        self.passed = 0
        self.failed = []

    def check(self, ok, what, why=""):
        if ok:
            self.passed += 1
            print(f"ok    {what}")
        else:
            self.failed.append(what)
            print(f"FAIL  {what}" + (f": {why}" if why else ""))
        return ok


def settings_from_config(path):
    """Environment variable names of the gateway's settings: the `env = "NAME"` of src/config.rs."""
    return set(re.findall(r'\benv\s*=\s*"([A-Z][A-Z0-9_]*)"', path.read_text(encoding="utf-8")))


def dockerfile_facts(path):
    """ENV settings, EXPOSEd ports and the HEALTHCHECK command of the Dockerfile's final stage."""
    text = path.read_text(encoding="utf-8")
    # Join continuation lines, drop comments, keep the last stage.
    logical = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    stages = re.split(r"(?im)^\s*FROM\s", logical)
    final = stages[-1]
    env = {}
    for line in re.findall(r"(?im)^\s*ENV\s+(.*)$", final):
        for key, value in re.findall(r'([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|\S+)', line):
            env[key] = value.strip('"')
    exposed = {int(p.split("/")[0]) for line in re.findall(r"(?im)^\s*EXPOSE\s+(.*)$", final) for p in line.split()}
    health = re.findall(r"(?im)^\s*HEALTHCHECK\s+(.*)$", final)
    return env, exposed, (health[-1] if health else None)


def environment(service):
    """A service's environment as a dict, from either the mapping or the list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def mounts(service):
    """[(kind, source, target)] of a service's volumes, kind 'bind' or 'volume', short or long syntax."""
    found = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            found.append((v.get("type", "volume"), v.get("source"), v.get("target")))
            continue
        parts = v.split(":")
        source, target = (parts[0], parts[1]) if len(parts) >= 2 else (None, parts[0])
        kind = "bind" if source and source.startswith((".", "/", "~")) else "volume"
        found.append((kind, source, target))
    return found


def published(service):
    """[(host_ip, host_port, container_port)] of a service's ports, short or long syntax."""
    found = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            found.append((p.get("host_ip"), p.get("published"), int(p["target"])))
            continue
        parts = str(p).split("/")[0].rsplit(":", 2)
        if len(parts) == 3:
            found.append((parts[0], parts[1], int(parts[2])))
        elif len(parts) == 2:
            found.append((None, parts[0], int(parts[1])))
        else:
            found.append((None, None, int(parts[0])))
    return found


def command_flags(service):
    """`--flag=value` options of a service's command as a dict."""
    command = service.get("command") or []
    if isinstance(command, str):
        command = command.split()
    flags = {}
    for arg in command:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            flags[key] = value
    return flags


def host_path(compose_dir, source):
    return (compose_dir / source).resolve()


def mounted_source(compose_dir, service, container_path):
    """The repository path bind-mounted at container_path in service (a file or a directory mount above it)."""
    for kind, source, target in mounts(service):
        if kind != "bind" or not target:
            continue
        target = target.rstrip("/")
        if container_path == target:
            return host_path(compose_dir, source)
        if container_path.startswith(target + "/"):
            return host_path(compose_dir, source) / container_path[len(target) + 1:]
    return None


def listen_ports(listen):
    """TCP ports and whether each binds every interface, from an INGEST_LISTEN value."""
    found = []
    for item in listen.split(","):
        item = item.strip()
        if not item or item.startswith("unix:"):
            continue
        host, _, port = item.rpartition(":")
        found.append((int(port), host in ("0.0.0.0", "[::]", "::", "")))
    return found


def check_cluster(services, compose_dir, settings, c):
    """The JetStream topology (docker-compose.cluster.yml): NATS servers routed to each other and reading one accounts
    file, gateways and writers that agree on the JetStream settings (the signing key and inbox prefix included), reach
    every NATS server and PostgreSQL, each as a NATS user of its own role (only gateways may publish records), and
    Prometheus scraping them."""
    nats = sorted(n for n in services if n.startswith("nats-"))
    ingest = sorted(n for n in services if n.startswith(("gateway-", "writer-")))
    c.check(len(nats) >= 3, f"{len(nats)} NATS servers (3 for a replicated stream)")
    for name in nats:
        flags = [str(a) for a in services[name].get("command") or []]
        c.check("-js" in flags, f"{name}: JetStream is enabled (-js)")
        routes = flags[flags.index("--routes") + 1] if "--routes" in flags else ""
        routed = {urllib.parse.urlparse(r).hostname for r in routes.split(",") if r}
        c.check(routed == set(nats) - {name}, f"{name}: routes to every other NATS server", f"routes {routes}")
        store = flags[flags.index("-sd") + 1] if "-sd" in flags else None
        c.check(store is not None and store in [t for _, _, t in mounts(services[name])],
                f"{name}: its store directory is a volume")
    agreed = ("INGEST_QUEUE", "INGEST_NATS_URL", "INGEST_JETSTREAM_REPLICAS", "INGEST_JETSTREAM_SHARDS",
              "INGEST_JETSTREAM_DUPLICATE_WINDOW", "INGEST_JETSTREAM_MAX_BYTES", "DATABASE_URL",
              "INGEST_JETSTREAM_SIGNING_KEY_FILE", "INGEST_NATS_INBOX_PREFIX")
    users = nats_users(services, nats, compose_dir, c)
    signing_sources = set()
    first = None
    for name in ingest:
        service = services[name]
        env = environment(service)
        for key in env:
            if key.startswith("INGEST_") or key == "DATABASE_URL":
                c.check(key in settings, f"{name}: {key} is a setting of src/config.rs")
        c.check(env.get("INGEST_QUEUE") == "jetstream", f"{name}: INGEST_QUEUE is jetstream")
        hosts = {urllib.parse.urlparse(u).hostname for u in str(env.get("INGEST_NATS_URL", "")).split(",") if u}
        c.check(hosts == set(nats), f"{name}: INGEST_NATS_URL names every NATS server", f"{sorted(hosts)}")
        c.check(str(env.get("INGEST_JETSTREAM_REPLICAS")) == str(len(nats)),
                f"{name}: INGEST_JETSTREAM_REPLICAS is the number of NATS servers")
        c.check(urllib.parse.urlparse(str(env.get("DATABASE_URL", ""))).hostname == POSTGRES,
                f"{name}: DATABASE_URL names the {POSTGRES} service")
        picked = {k: str(env.get(k)) for k in agreed}
        first = first or picked
        c.check(picked == first, f"{name}: the JetStream settings match the other processes'", f"{picked}")
        role = [str(a) for a in service.get("command") or []]
        if name.startswith("writer-"):
            c.check(role[:1] == ["write"], f"{name}: runs `write`")
        else:
            c.check(role[:1] in (["serve"], []), f"{name}: runs `serve`")
            c.check(str(env.get("INGEST_JETSTREAM_LOCAL_WRITERS")) == "false",
                    f"{name}: leaves writing to the writers (INGEST_JETSTREAM_LOCAL_WRITERS=false)")
        data_dir = env.get("INGEST_DATA_DIR")
        c.check(data_dir in [t for _, _, t in mounts(service)], f"{name}: INGEST_DATA_DIR is a mounted volume")
        # NATS is a trust boundary: a signing key every process shares, and a user of the role's own.
        key = mounted_source(compose_dir, service, str(env.get("INGEST_JETSTREAM_SIGNING_KEY_FILE", "")))
        if c.check(key is not None and key.is_file(), f"{name}: INGEST_JETSTREAM_SIGNING_KEY_FILE is a mounted file"):
            signing_sources.add(key)
        user = env.get("INGEST_NATS_USER")
        block = users.get(user)
        prefix = str(env.get("INGEST_NATS_INBOX_PREFIX", "_INBOX"))
        if c.check(block is not None, f"{name}: INGEST_NATS_USER {user} is a user of the NATS servers' accounts"):
            publishes_records = '"ingest.location.*"' in block
            role = "gateway" if name.startswith("gateway-") else "writer"
            c.check(publishes_records == (role == "gateway"),
                    f"{name}: its NATS user may publish records exactly when it is a gateway")
            c.check(f'"{prefix}.>"' in block, f"{name}: its NATS user takes replies under {prefix}")
    c.check(len(signing_sources) == 1, "every gateway and writer mounts the same signing key file",
            f"{sorted(map(str, signing_sources))}")
    prom = services.get(PROMETHEUS, {})
    config = mounted_source(compose_dir, prom, PROMETHEUS_CONFIG_DEFAULT)
    if c.check(config is not None and config.is_file(), f"{PROMETHEUS}: its configuration file is mounted"):
        scraped = set()
        for job in (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("scrape_configs") or []:
            for static in job.get("static_configs") or []:
                scraped.update(static.get("targets") or [])
        for name in ingest:
            port = listen_ports(str(environment(services[name]).get("INGEST_LISTEN", "")))
            wanted = {f"{name}:{p}" for p, _ in port}
            c.check(bool(wanted & scraped), f"{PROMETHEUS}: scrapes {name} on its listen port", f"{sorted(scraped)}")
    for name, service in services.items():
        for kind, source, _ in mounts(service):
            if kind == "bind":
                c.check(host_path(compose_dir, source).exists(), f"{name}: the mounted {source} exists")


def nats_users(services, nats, compose_dir, c):
    """{user: the text of its entry} of the accounts file every NATS server reads (`-c`), which must be one and the
    same mounted file."""
    sources = set()
    for name in nats:
        flags = [str(a) for a in services[name].get("command") or []]
        path = flags[flags.index("-c") + 1] if "-c" in flags else None
        source = mounted_source(compose_dir, services[name], path) if path else None
        if c.check(source is not None and source.is_file(), f"{name}: reads a mounted accounts file (-c)"):
            sources.add(source)
    if not c.check(len(sources) == 1, "every NATS server reads the same accounts file"):
        return {}
    text = next(iter(sources)).read_text(encoding="utf-8")
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    entries = re.split(r"(?m)^\s*user:\s*", text)[1:]
    return {entry.split()[0].strip('"'): entry for entry in entries}


def main(argv):
    compose_path = Path(argv[1]).resolve() if len(argv) > 1 else ROOT / "docker-compose.yml"
    compose_dir = compose_path.parent
    try:
        compose = yaml.safe_load(compose_path.read_text(encoding="utf-8"))
        settings = settings_from_config(ROOT / "src/config.rs")
        routes = set(re.findall(r'named\("([^"]+)"\)', (ROOT / "src/http/mod.rs").read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not settings or not routes:
        print("error: found no settings in src/config.rs or no routes in src/http/mod.rs", file=sys.stderr)
        return 2
    c = Checks()
    services = compose.get("services") or {}
    if any(name.startswith("nats-") for name in services):
        check_cluster(services, compose_dir, settings, c)
        print(f"\n{c.passed} checks passed, {len(c.failed)} failed")
        return 1 if c.failed else 0
    for name in (POSTGRES, GATEWAY, PROMETHEUS, GRAFANA):
        c.check(name in services, f"service {name} is defined")
    if c.failed:
        return 1
    pg, gw, prom, graf = (services[n] for n in (POSTGRES, GATEWAY, PROMETHEUS, GRAFANA))

    # --- the gateway's image and settings
    build = gw.get("build")
    context = build if isinstance(build, str) else (build or {}).get("context", ".")
    dockerfile = host_path(compose_dir, context) / ((build or {}).get("dockerfile", "Dockerfile")
                                                     if isinstance(build, dict) else "Dockerfile")
    if not c.check(dockerfile.is_file(), f"{GATEWAY} is built from {dockerfile.relative_to(ROOT)}"):
        return 1
    image_env, exposed, healthcheck = dockerfile_facts(dockerfile)

    for service_name, service in services.items():
        for key in environment(service):
            if key.startswith("INGEST_") or key == "DATABASE_URL":
                c.check(key in settings, f"{service_name}: {key} is a setting of src/config.rs",
                        f"src/config.rs has {', '.join(sorted(settings))}")
    for key in image_env:
        if key.startswith("INGEST_") or key == "DATABASE_URL":
            c.check(key in settings, f"Dockerfile: ENV {key} is a setting of src/config.rs")

    gw_env = {**image_env, **{k: v for k, v in environment(gw).items() if v is not None}}

    # DATABASE_URL names the postgres service and its credentials.
    pg_env = environment(pg)
    url = urllib.parse.urlsplit(gw_env.get("DATABASE_URL", ""))
    pg_user = pg_env.get("POSTGRES_USER") or "postgres"
    pg_port = int(pg_env.get("PGPORT") or 5432)
    if c.check(url.scheme in ("postgres", "postgresql"), f"{GATEWAY}: DATABASE_URL is a postgres:// URL",
               f"got {gw_env.get('DATABASE_URL')!r}"):
        c.check(url.hostname == POSTGRES, f"{GATEWAY}: DATABASE_URL's host is the {POSTGRES} service",
                f"got {url.hostname!r}")
        c.check((url.port or 5432) == pg_port, f"{GATEWAY}: DATABASE_URL's port is the one {POSTGRES} listens on",
                f"{url.port or 5432} vs {pg_port}")
        c.check(urllib.parse.unquote(url.username or "") == pg_user, f"{GATEWAY}: DATABASE_URL's user is POSTGRES_USER")
        c.check(urllib.parse.unquote(url.password or "") == (pg_env.get("POSTGRES_PASSWORD") or ""),
                f"{GATEWAY}: DATABASE_URL's password is POSTGRES_PASSWORD")
        c.check(url.path.lstrip("/") == (pg_env.get("POSTGRES_DB") or pg_user),
                f"{GATEWAY}: DATABASE_URL's database is POSTGRES_DB")
    depends = gw.get("depends_on") or []
    c.check(POSTGRES in depends, f"{GATEWAY} depends on {POSTGRES}")

    # The listen port, everywhere it appears.
    listen = listen_ports(gw_env.get("INGEST_LISTEN", "127.0.0.1:8080"))
    open_ports = {port for port, every in listen if every}
    c.check(bool(open_ports), f"{GATEWAY}: INGEST_LISTEN binds every interface of the container (other containers "
                              "scrape and call it)", f"got {gw_env.get('INGEST_LISTEN')!r}")
    gw_port = min(open_ports) if open_ports else None
    c.check(gw_port in exposed, f"{GATEWAY}: the Dockerfile EXPOSEs the listen port {gw_port}", f"EXPOSE {exposed}")
    if c.check(healthcheck is not None, "Dockerfile has a HEALTHCHECK"):
        m = re.search(r"https?://(?:127\.0\.0\.1|localhost)(?::(\d+))?(/[^\s\"']*)", healthcheck)
        if c.check(m is not None, "HEALTHCHECK asks the gateway over HTTP on loopback", healthcheck):
            c.check(int(m.group(1) or 80) == gw_port, f"HEALTHCHECK asks the listen port {gw_port}")
            # Liveness, which needs no admin token whatever the keys; readiness is a load balancer's question.
            c.check(m.group(2) == "/healthz" and m.group(2) in routes, "HEALTHCHECK asks /healthz, a route of the gateway",
                    f"asks {m.group(2)}; routes: {sorted(routes)}")
    # The image listens beyond loopback: it must need keys unless a deployment says otherwise.
    c.check(str(image_env.get("INGEST_ALLOW_ANONYMOUS", "false")).lower() != "true",
            "Dockerfile: the image needs API keys (no INGEST_ALLOW_ANONYMOUS=true)")
    listens_beyond_loopback = any(everywhere for _, everywhere in listen_ports(gw_env.get("INGEST_LISTEN", "")))
    c.check(not listens_beyond_loopback or "INGEST_API_KEYS_FILE" in gw_env
            or str(gw_env.get("INGEST_ALLOW_ANONYMOUS")).lower() == "true",
            f"{GATEWAY}: listening beyond loopback, it has API keys or says INGEST_ALLOW_ANONYMOUS=true")

    data_dir = gw_env.get("INGEST_DATA_DIR", "./data")
    c.check(any(t and t.rstrip("/") == data_dir.rstrip("/") for _, _, t in mounts(gw)),
            f"{GATEWAY}: INGEST_DATA_DIR ({data_dir}, the write-ahead log) is a mounted volume")

    # --- mounts and volumes, every service
    declared = set((compose.get("volumes") or {}).keys())
    for service_name, service in services.items():
        for kind, source, target in mounts(service):
            if kind == "bind":
                path = host_path(compose_dir, source)
                inside = path == ROOT or ROOT in path.parents
                c.check(inside and path.exists(), f"{service_name}: bind mount {source} exists in the repository",
                        "missing" if inside else "outside the repository")
            elif source:
                c.check(source in declared, f"{service_name}: named volume {source} is declared")

    # --- Prometheus: its configuration, rule files and scrape targets
    prom_flags = command_flags(prom)
    prom_config_path = prom_flags.get("config.file", PROMETHEUS_CONFIG_DEFAULT)
    prom_port = int(prom_flags.get("web.listen-address", "0.0.0.0:9090").rpartition(":")[2])
    prom_config_file = mounted_source(compose_dir, prom, prom_config_path)
    scrape_interval = None
    if c.check(prom_config_file is not None and prom_config_file.is_file(),
               f"{PROMETHEUS}: {prom_config_path} is a mounted file of the repository"):
        prom_config = yaml.safe_load(prom_config_file.read_text(encoding="utf-8"))
        scrape_interval = (prom_config.get("global") or {}).get("scrape_interval", "1m")
        for rule_file in prom_config.get("rule_files") or []:
            in_container = posixpath.normpath(posixpath.join(posixpath.dirname(prom_config_path), rule_file))
            source = mounted_source(compose_dir, prom, in_container)
            c.check(source is not None and source.is_file(),
                    f"{PROMETHEUS}: rule file {rule_file} ({in_container}) is a mounted file of the repository")
            if source is not None and source.is_file():
                rules_text = source.read_text(encoding="utf-8")
                for job in re.findall(r'job="([^"]+)"', rules_text):
                    jobs = [s.get("job_name") for s in prom_config.get("scrape_configs") or []]
                    c.check(job in jobs, f"{PROMETHEUS}: the rules' job=\"{job}\" is a scrape job", f"jobs: {jobs}")
        for scrape in prom_config.get("scrape_configs") or []:
            for static in scrape.get("static_configs") or []:
                for target in static.get("targets") or []:
                    host, _, port = target.rpartition(":")
                    c.check(host in services, f"{PROMETHEUS}: scrape target {target} is a compose service")
                    if host == GATEWAY:
                        c.check(int(port) == gw_port, f"{PROMETHEUS}: scrapes {GATEWAY} on its listen port {gw_port}")
                        c.check(scrape.get("metrics_path", "/metrics") in routes,
                                f"{PROMETHEUS}: scrapes {scrape.get('metrics_path', '/metrics')}, a route of the gateway")

    # --- Grafana: provisioning, dashboards, data source
    graf_env = environment(graf)
    provisioning = graf_env.get("GF_PATHS_PROVISIONING") or GRAFANA_PROVISIONING_DEFAULT
    prov_dir = mounted_source(compose_dir, graf, provisioning)
    graf_port = int(graf_env.get("GF_SERVER_HTTP_PORT") or 3000)
    if c.check(prov_dir is not None and prov_dir.is_dir(), f"{GRAFANA}: {provisioning} is a mounted directory"):
        for provider_file in sorted((prov_dir / "dashboards").glob("*.y*ml")):
            for provider in (yaml.safe_load(provider_file.read_text(encoding="utf-8")) or {}).get("providers") or []:
                path = (provider.get("options") or {}).get("path", "")
                source = mounted_source(compose_dir, graf, path.rstrip("/"))
                ok = source is not None and source.is_dir() and any(source.glob("*.json"))
                c.check(ok, f"{GRAFANA}: dashboard provider path {path} is a mounted directory with dashboards")
        home = graf_env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
        if home:
            source = mounted_source(compose_dir, graf, home)
            c.check(source is not None and source.is_file(), f"{GRAFANA}: home dashboard {home} is a mounted file")
        for ds_file in sorted((prov_dir / "datasources").glob("*.y*ml")):
            for ds in (yaml.safe_load(ds_file.read_text(encoding="utf-8")) or {}).get("datasources") or []:
                if ds.get("type") != "prometheus":
                    continue
                u = urllib.parse.urlsplit(ds.get("url", ""))
                c.check(u.hostname == PROMETHEUS and (u.port or 80) == prom_port,
                        f"{GRAFANA}: data source {ds.get('name')} is {PROMETHEUS}:{prom_port}", f"got {ds.get('url')}")
                time_interval = (ds.get("jsonData") or {}).get("timeInterval")
                c.check(time_interval == scrape_interval,
                        f"{GRAFANA}: data source timeInterval equals Prometheus's scrape_interval",
                        f"{time_interval} vs {scrape_interval}")

    # --- published ports are ports the services listen on
    listening = {POSTGRES: {pg_port}, GATEWAY: set(open_ports), PROMETHEUS: {prom_port}, GRAFANA: {graf_port}}
    for service_name, service in services.items():
        for host_ip, host_port, container_port in published(service):
            c.check(container_port in listening.get(service_name, set()),
                    f"{service_name}: publishes {host_port or '(any)'} -> {container_port}, a port it listens on",
                    f"it listens on {sorted(listening.get(service_name, set()))}")

    if c.failed:
        print(f"\n{len(c.failed)} of {c.passed + len(c.failed)} compose checks failed")
        return 1
    print(f"\nok: {c.passed} compose checks")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

# Checks the Grafana dashboard's queries and the alert rules against a real Prometheus that scrapes a live gateway under load.
"""Evaluate every dashboard query and alert rule through a real Prometheus scraping a live gateway.

Usage:
    cargo run -- serve &                        # or any gateway reachable on loopback
    python3 grafana/check-dashboard-prometheus.py --target 127.0.0.1:8080

What it does, all bounded by --timeout:
  1. starts `prometheus` (Debian: apt-get install prometheus) on 127.0.0.1 and a free port, with a temporary
     storage directory, a short scrape interval and prometheus/alerts.yml as its rule file;
  2. waits until it has scraped the gateway (up == 1), then sends the gateway a paced, bounded load of its own
     for --load-seconds (location arrays, poll results, a few invalid, unparsable and repeated updates, so that
     accepted, written, rejected and duplicate counters all move);
  3. evaluates, through /api/v1/query at the instant the load ended, every template variable query (whose values
     then replace $instance, $stream, ...) and every panel query of the dashboard, with Grafana's built-in
     variables substituted as Grafana would for a view of that window: $__interval is the scrape interval,
     $__rate_interval max($__interval + scrape interval, 4 x scrape interval), $__range the time since the first
     scrape;
  4. lists the alert rules Prometheus loaded, checks that every rule of the file is there and evaluates without
     error, and evaluates each rule's expression too (empty means "not firing").

A query passes when Prometheus accepts it and returns at least one series with a number (a result of NaN only,
such as a quantile over no observations, draws nothing in Grafana). Queries over counters that may legitimately
stay at 0 (dead letters, refusals by reason) pass because the gateway exports those counters at 0 for every label
from the start; where a series only appears with its first event (an HTTP status), the dashboard query itself ends
in `or vector(0)`.

Exit status: 0 every query returned data and every rule evaluated, 1 otherwise, 2 bad usage or set-up failure
(no prometheus binary, Prometheus or the gateway unreachable, timeout). Standard library only.
"""

import argparse
import ctypes
import http.client
import importlib.util
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = "ingest-gateway"  # the job name prometheus/prometheus.yml uses and the IngestGatewayDown alert selects

# The dashboard parser of the name check (check-dashboard.py), so both checks read the dashboard the same way.
_spec = importlib.util.spec_from_file_location("check_dashboard", Path(__file__).with_name("check-dashboard.py"))
check_dashboard = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_dashboard)

VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]")
# Characters Grafana escapes in a multi-value variable for a Prometheus regex matcher (inside a PromQL string, so
# the backslash itself is written twice).
REGEX_SPECIAL = re.compile(r"[$^*{}\[\]'+?.()|\\]")


class SetupError(Exception):
    """Something the check needs is missing or did not start: exit status 2, not a dashboard fault."""


# --- Prometheus -------------------------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent():
    """Runs in the child before exec: Linux kills Prometheus if this script dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the finally block of main() still stops it


class Prometheus:
    """A throwaway Prometheus on loopback: temporary storage, stopped (and its directory removed) on close."""

    def __init__(self, binary, target, rules, scrape_seconds):
        self.dir = tempfile.mkdtemp(prefix="prometheus-check-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.dir, "prometheus.log")
        interval = f"{scrape_seconds:g}s"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": JOB, "metrics_path": "/metrics",
                                "static_configs": [{"targets": [target]}]}],
        }
        config_path = os.path.join(self.dir, "prometheus.yml")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)  # JSON is valid YAML
        self.log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={os.path.join(self.dir, 'data')}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
             "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent,
        )

    def log_tail(self, lines=20):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def get(self, path, params=None):
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)

    def query(self, expr, at):
        """Instant query; returns (result_type, result) or raises ValueError with Prometheus's error."""
        body = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"}).encode()
        req = urllib.request.Request(self.url + "/api/v1/query", data=body,
                                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                doc = json.load(r)
        except urllib.error.HTTPError as e:
            try:
                doc = json.load(e)
            except ValueError:
                raise ValueError(f"HTTP {e.code}") from None
        if doc.get("status") != "success":
            raise ValueError(f"{doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]["resultType"], doc["data"]["result"]

    def wait_ready(self, deadline):
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(f"prometheus exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.2)
        raise SetupError(f"prometheus did not become ready:\n{self.log_tail()}")

    def wait_scraped(self, deadline):
        """Waits until Prometheus has scraped the gateway successfully."""
        last = None
        while time.monotonic() < deadline:
            try:
                _, result = self.query(f'up{{job="{JOB}"}}', time.time())
                last = result
                if any(float(s["value"][1]) == 1 for s in result):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        targets = ""
        try:
            targets = json.dumps(self.get("/api/v1/targets")["data"]["activeTargets"], indent=1)[:2000]
        except (OSError, ValueError, KeyError):
            pass
        raise SetupError(f"prometheus never scraped the gateway successfully (up = {last}):\n{targets}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- load -------------------------------------------------------------------------------------------------------


class Load:
    """A paced load on loopback, bounded in time and in requests: a few clients, each sending a mix of valid,
    invalid, unparsable and repeated updates on both streams, pausing between rounds so that the gateway, its
    PostgreSQL and Prometheus keep their share of the machine."""

    def __init__(self, target, seconds, clients, pause, max_requests):
        self.host, _, port = target.rpartition(":")
        self.port = int(port)
        self.seconds = seconds
        self.clients = clients
        self.pause = pause
        self.max_requests = max_requests
        self.run = f"{int(time.time())}{random.randrange(1000):03d}"
        self.statuses = {}
        self.sent = 0
        self.errors = []
        self.lock = threading.Lock()

    def _count(self, status):
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.sent += 1
            return self.sent <= self.max_requests

    def _post(self, conn, path, body):
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return self._count(response.status)

    def _client(self, n, until):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        project_base = random.randrange(1, 1 << 40) * 1000
        previous = None
        i = 0
        try:
            while time.monotonic() < until:
                now = datetime.now(timezone.utc)
                stamp = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
                location = json.dumps([
                    {"device_id": f"check-{self.run}-{n}-{i}-{j}", "recorded_at": stamp,
                     "lat": 48.85 + j / 1000, "lon": 2.35, "speed_kmh": 40 + j}
                    for j in range(20)
                ])
                poll = json.dumps({"project_id": project_base + i, "polled_at": int(now.timestamp() * 1000),
                                   "success": i % 7 != 0, "status_code": 200, "response_time_ms": 40 + i % 50})
                going = self._post(conn, "/api/v1/location/update", location)
                going = going and self._post(conn, "/api/v1/poll/update", poll)
                if i % 10 == 5 and previous:
                    # A client retry: accepted again, absorbed as a duplicate when written.
                    going = going and self._post(conn, "/api/v1/location/update", previous)
                if i % 10 == 7:
                    bad = json.dumps({"device_id": f"check-{self.run}-{n}-{i}-bad", "recorded_at": stamp,
                                      "lat": 123.0, "lon": 2.35})
                    going = going and self._post(conn, "/api/v1/location/update", bad)  # 422 invalid_update
                if i % 25 == 11:
                    going = going and self._post(conn, "/api/v1/poll/update", "{not json")  # 400 invalid_json
                previous = location
                i += 1
                if not going:
                    break
                time.sleep(self.pause)
        except (OSError, http.client.HTTPException) as e:
            with self.lock:
                self.errors.append(f"client {n}: {e}")
        finally:
            conn.close()

    def run_for(self):
        until = time.monotonic() + self.seconds
        threads = [threading.Thread(target=self._client, args=(n, until), daemon=True) for n in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.seconds + 30)


# --- dashboard --------------------------------------------------------------------------------------------------


def variable_definitions(dashboard):
    """Return [(name, expr, label, is_multi)] for the Prometheus query variables, in dashboard order."""
    found = []
    for var in (dashboard.get("templating") or {}).get("list", []):
        if var.get("type") != "query":
            continue
        ds = var.get("datasource")
        if isinstance(ds, dict) and ds.get("type") not in (None, "prometheus"):
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if not isinstance(query, str):
            continue
        m = re.fullmatch(r"\s*label_values\s*\((.*),\s*([a-zA-Z_]\w*)\s*\)\s*", query, re.DOTALL)
        expr = check_dashboard.variable_query_expr(query)
        multi = bool(var.get("multi") or var.get("includeAll"))
        found.append((var.get("name"), expr, m.group(2) if m else None, multi))
    return found


def grafana_seconds(text):
    """A Grafana interval such as "30s", "1m" or ">15s" in seconds; None when unset or not one."""
    m = re.fullmatch(r">?\s*(\d+(?:\.\d+)?)(ms|s|m|h|d)", (text or "").strip())
    if not m:
        return None
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def panel_queries(dashboard):
    """[(where, expr, min_interval)] for every panel query: check-dashboard.py's list of expressions, with the
    minimum interval (seconds or None) that the panel or the query sets, which raises $__interval for it."""
    intervals = {}

    def walk(node, where, interval):
        if isinstance(node, dict):
            if isinstance(node.get("title"), str) and ("type" in node or "gridPos" in node):
                where = f'panel "{node["title"]}"'
                interval = grafana_seconds(node.get("interval")) or interval
            expr = node.get("expr")
            if isinstance(expr, str) and expr.strip():
                ref = node.get("refId")
                own = grafana_seconds(node.get("interval"))
                intervals[(f"{where}, refId {ref}" if ref else where, expr)] = max(filter(None, (interval, own)),
                                                                                   default=None)
            for key, value in node.items():
                if key != "templating":
                    walk(value, where, interval)
        elif isinstance(node, list):
            for item in node:
                walk(item, where, interval)

    walk({k: v for k, v in dashboard.items() if k != "templating"}, "dashboard", None)
    variables = {f'variable "{v.get("name")}"' for v in (dashboard.get("templating") or {}).get("list", [])}
    return [(w, e, intervals.get((w, e))) for w, e in check_dashboard.dashboard_exprs(dashboard) if w not in variables]


def format_variable(values, multi):
    """A variable's values as Grafana writes them into a Prometheus query."""
    if multi:
        escaped = [REGEX_SPECIAL.sub(lambda c: "\\\\" + c.group(), v) for v in values]
        return "(" + "|".join(escaped) + ")" if len(escaped) > 1 else escaped[0]
    return values[0].replace("\\", "\\\\").replace("'", "\\'")


def substitute(expr, values):
    """Replace every Grafana variable in expr; raise KeyError naming one that has no value."""
    def one(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(name)
        return values[name]
    return VARIABLE.sub(one, expr)


def describe(result_type, result):
    """(has_number, summary) of a query result."""
    if result_type == "scalar":
        value = float(result[1])
        return not math.isnan(value), f"scalar {value:g}"
    if result_type != "vector":
        return bool(result), f"{result_type} with {len(result)} entries"
    numbers = [float(s["value"][1]) for s in result]
    has_number = any(not math.isnan(v) for v in numbers)
    shown = []
    for s, v in list(zip(result, numbers))[:6]:
        labels = ",".join(f"{k}={s['metric'][k]}" for k in sorted(s["metric"])
                          if k not in ("__name__", "job", "instance"))
        shown.append(f"{{{labels}}} {v:.4g}")
    more = f" (+{len(result) - 6} more)" if len(result) > 6 else ""
    return has_number, f"{len(result)} series: " + "; ".join(shown) + more


def rule_names(rules_path):
    """Names of the alerting rules in a rule file, read without a YAML parser (`- alert: Name` lines)."""
    with open(rules_path, encoding="utf-8") as f:
        return re.findall(r"^\s*-\s*alert:\s*['\"]?([A-Za-z_:][\w:]*)", f.read(), re.MULTILINE)


# --- main -------------------------------------------------------------------------------------------------------


def seconds(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 1s or 500ms")
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, None: 1}[m.group(2)]


def run(args, prom, deadline):
    with open(args.dashboard, encoding="utf-8") as f:
        dashboard = json.load(f)
    problems = []
    lines = []

    prom.wait_ready(deadline)
    prom.wait_scraped(deadline)
    first_scrape = time.time()
    print(f"prometheus {prom.url} scrapes {args.target} every {args.scrape_interval:g}s; "
          f"loading the gateway for {args.load_seconds:g}s")

    load = Load(args.target, args.load_seconds, args.load_clients, args.load_pause, args.max_requests)
    load.run_for()
    load_end = time.time()
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(load.statuses.items()))
    print(f"load: {load.sent} requests ({statuses})" + (f"; errors: {'; '.join(load.errors)}" if load.errors else ""))
    if not load.statuses.get(202):
        raise SetupError("the gateway accepted nothing during the load")
    # Let the scrapes after the load's last request, and a rule evaluation on them, land.
    time.sleep(2 * args.scrape_interval + 0.5)
    at = load_end

    scrape = args.scrape_interval
    range_s = max(1, round(at - first_scrape))

    def builtins(min_interval=None):
        """Grafana's own variables: $__interval is at least the data source's interval (the scrape interval here)
        and the panel's minimum interval; $__rate_interval is max($__interval + scrape interval, 4 x scrape)."""
        interval = max(scrape, args.interval or scrape, min_interval or 0)
        return {
            "__interval": f"{interval * 1000:.0f}ms", "__interval_ms": f"{interval * 1000:.0f}",
            "__rate_interval": f"{max(interval + scrape, 4 * scrape) * 1000:.0f}ms",
            "__range": f"{range_s}s", "__range_s": str(range_s), "__range_ms": str(range_s * 1000),
        }

    values = builtins()
    print(f"evaluated at the end of the load with $__interval={values['__interval']}, "
          f"$__rate_interval={values['__rate_interval']} (unless a panel sets a longer minimum interval), "
          f"$__range={values['__range']}\n")

    # Template variables first: their values go into the panel queries.
    for name, expr, label, multi in variable_definitions(dashboard):
        where = f'variable "{name}"'
        if not expr:
            problems.append(f"{where}: cannot evaluate its query through /api/v1/query")
            continue
        try:
            result_type, result = prom.query(substitute(expr, values), at)
        except KeyError as e:
            problems.append(f"{where}: uses ${e.args[0]}, which has no value here")
            continue
        except ValueError as e:
            problems.append(f"{where}: Prometheus rejects {expr!r}: {e}")
            continue
        if not label:
            # Not label_values(...): checked for data, but without a label to take its values from.
            ok = bool(result)
            lines.append(f"{'ok  ' if ok else 'FAIL'}  {where}: {expr} -> {len(result)} results")
            if not ok:
                problems.append(f"{where}: {expr} returned no data")
            continue
        found = sorted({s["metric"][label] for s in result if label in s["metric"]})
        if not found:
            problems.append(f"{where}: {expr} returned no values")
            lines.append(f"FAIL  {where}: {expr} -> no values")
            continue
        values[name] = format_variable(found, multi)
        lines.append(f"ok    {where}: {expr} -> {', '.join(found)}")

    panel_exprs = panel_queries(dashboard)
    for where, expr, min_interval in panel_exprs:
        if min_interval:
            where += f" ($__rate_interval={builtins(min_interval)['__rate_interval']})"
        try:
            query = substitute(expr, {**values, **builtins(min_interval)})
        except KeyError as e:
            problems.append(f"{where}: uses ${e.args[0]}, which has no value here")
            lines.append(f"FAIL  {where}: uses ${e.args[0]}, which has no value here")
            continue
        try:
            result_type, result = prom.query(query, at)
        except ValueError as e:
            problems.append(f"{where}: Prometheus rejects the query: {e}\n    {query}")
            lines.append(f"FAIL  {where}: rejected: {e}")
            continue
        has_number, summary = describe(result_type, result)
        if not result:
            problems.append(f"{where}: no data\n    {query}")
            lines.append(f"FAIL  {where}: no data")
        elif not has_number:
            problems.append(f"{where}: only NaN ({summary})\n    {query}")
            lines.append(f"FAIL  {where}: {summary}")
        else:
            lines.append(f"ok    {where}: {summary}")

    # Alert rules: loaded, evaluated without error, and each expression evaluated here too.
    expected = rule_names(args.rules)
    loaded = {}
    while True:
        groups = prom.get("/api/v1/rules", {"type": "alert"})["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        if all(loaded.get(n, {}).get("health") not in (None, "unknown") for n in expected) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for name in expected:
        rule = loaded.get(name)
        if rule is None:
            problems.append(f'alert "{name}": not loaded by Prometheus')
            lines.append(f'FAIL  alert "{name}": not loaded')
            continue
        try:
            result_type, result = prom.query(rule["query"], at)
            _, summary = describe(result_type, result)
            summary = summary if result else "empty (condition false)"
        except ValueError as e:
            summary = f"rejected: {e}"
        health = rule.get("health")
        status = "ok  " if health == "ok" else "FAIL"
        if health != "ok":
            problems.append(f'alert "{name}": health {health}: {rule.get("lastError")}')
        lines.append(f'{status}  alert "{name}": health {health}, state {rule.get("state")}, expression {summary}')

    for line in lines:
        print(line)
    return problems, len(panel_exprs), len(expected)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="the gateway's TCP address on this machine, host:port")
    parser.add_argument("--dashboard", default=str(ROOT / "grafana/dashboards/ingest-gateway.json"))
    parser.add_argument("--rules", default=str(ROOT / "prometheus/alerts.yml"), help="alert rule file to load")
    parser.add_argument("--prometheus", default="prometheus", help="the Prometheus binary (default: on the PATH)")
    parser.add_argument("--scrape-interval", type=seconds, default=1.0, help="scrape and rule interval (1s)")
    parser.add_argument("--interval", type=seconds, default=None,
                        help="$__interval (default: the scrape interval, Grafana's minimum)")
    parser.add_argument("--load-seconds", type=seconds, default=15.0, help="how long to load the gateway (15s)")
    parser.add_argument("--load-clients", type=int, default=4, help="concurrent load clients (4)")
    parser.add_argument("--load-pause", type=seconds, default=0.02, help="pause between a client's rounds (20ms)")
    parser.add_argument("--max-requests", type=int, default=100_000, help="bound on requests sent (100000)")
    parser.add_argument("--timeout", type=seconds, default=180.0, help="bound on the whole check (180s)")
    args = parser.parse_args(argv)

    host, _, port = args.target.rpartition(":")
    if not host or not port.isdigit():
        parser.error("--target must be host:port")
    if not (host in ("localhost", "::1", "[::1]") or host.startswith("127.")):
        parser.error("--target must be on loopback: the check sends load to it")
    binary = shutil.which(args.prometheus)
    if not binary:
        print(f"error: {args.prometheus} not found (Debian: apt-get install prometheus)", file=sys.stderr)
        return 2

    deadline = time.monotonic() + args.timeout
    # A stop (SIGTERM from CI, Ctrl-C) still runs the finally below, which stops Prometheus.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))

    def on_alarm(*_):
        raise SetupError(f"timed out after {args.timeout:g}s")

    # The deadline bounds each wait; the alarm bounds everything else (a stuck request) a little later.
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.timeout + 5)
    prom = Prometheus(binary, args.target, Path(args.rules).resolve(), args.scrape_interval)
    try:
        problems, n_panels, n_rules = run(args, prom, deadline)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        prom.close()

    if problems:
        print(f"\n{len(problems)} problem(s):")
        for p in problems:
            print(f"  {p}")
        return 1
    print(f"\nok: {n_panels} panel queries returned data, {n_rules} alert rules loaded and evaluated without error")
    return 0


if __name__ == "__main__":
    sys.exit(main())

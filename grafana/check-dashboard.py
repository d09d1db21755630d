# Checks that every metric name used in the Grafana dashboard's PromQL is exported by the gateway's /metrics.
"""Check a Grafana dashboard's PromQL against the metric families a live /metrics exports.

Usage:
    curl -s http://127.0.0.1:8080/metrics > /tmp/metrics.txt
    python3 grafana/check-dashboard.py grafana/dashboards/ingest-gateway.json /tmp/metrics.txt
    python3 grafana/check-dashboard.py --promtool grafana/dashboards/ingest-gateway.json /tmp/metrics.txt

The metrics file is the raw Prometheus text exposition; only its `# TYPE <name> <type>` lines are read.
Every `expr` in the dashboard (panels, nested rows, anything with an "expr" key) and every Prometheus query
variable is tokenised; identifiers that are metric names (not functions, keywords, label names, strings,
durations or Grafana variables) must be exported families. `_bucket`, `_sum` and `_count` are accepted on
histogram families (`_sum`/`_count` on summaries), and a histogram used without a suffix is an error.
With --promtool, every expression is also parsed by `promtool check rules` (Grafana variables substituted).

Exit status: 0 all known, 1 unknown metric names or unparsable expressions, 2 bad input or usage.
Standard library only.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

TOKEN = re.compile(
    r"""
      (?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<var>\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\])
    | (?P<num>(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)(?:[a-zA-Z]+\d*)*)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<comment>\#[^\n]*)
    | (?P<ws>\s+)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)

# Modifiers followed by a parenthesised list of label names.
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Bare words that are not metric names.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right", "on", "ignoring"}
# Aggregation operators, which may take their by/without clause before the parenthesis: sum by (x) (...).
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def tokens(expr):
    """Yield (kind, text) for the meaningful tokens of a PromQL expression."""
    for m in TOKEN.finditer(expr):
        kind = m.lastgroup
        if kind in ("ws", "comment"):
            continue
        yield kind, m.group()


def metric_names(expr):
    """Return the metric names an expression selects, in order of first use."""
    toks = list(tokens(expr))
    names = []
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else (None, None)
        if kind == "other" and text == "{":
            # Label matchers: skip, but honour {__name__="metric"}.
            j = i + 1
            while j < len(toks) and toks[j] != ("other", "}"):
                if toks[j] == ("ident", "__name__") and j + 2 < len(toks) \
                        and toks[j + 1] == ("other", "=") and toks[j + 2][0] == "str":
                    names.append(toks[j + 2][1][1:-1])
                j += 1
            i = j + 1
            continue
        if kind == "other" and text == "[":
            # Range or subquery: durations, steps and variables only.
            j = i + 1
            while j < len(toks) and toks[j] != ("other", "]"):
                j += 1
            i = j + 1
            continue
        if kind == "ident":
            low = text.lower()
            if low in LABEL_LIST_KEYWORDS and nxt == ("other", "("):
                depth = 0
                j = i + 1
                while j < len(toks):
                    if toks[j] == ("other", "("):
                        depth += 1
                    elif toks[j] == ("other", ")"):
                        depth -= 1
                        if depth == 0:
                            break
                    j += 1
                i = j + 1
                continue
            if nxt == ("other", "(") or (low in AGGREGATIONS and nxt[0] == "ident"
                                         and nxt[1].lower() in ("by", "without")):
                i += 1  # function or aggregation call
                continue
            if low not in KEYWORDS:
                names.append(text)
        i += 1
    seen = set()
    return [n for n in names if not (n in seen or seen.add(n))]


def variable_query_expr(query):
    """Turn a Prometheus query-variable definition into the PromQL it runs, or None."""
    q = query.strip()
    m = re.fullmatch(r"label_values\s*\((.*),\s*[a-zA-Z_]\w*\s*\)", q, re.DOTALL)
    if m:
        return m.group(1)
    if re.fullmatch(r"label_values\s*\(\s*[a-zA-Z_]\w*\s*\)", q) or re.fullmatch(r"label_names\s*\(\s*\)", q):
        return None
    if re.fullmatch(r"metrics\s*\(.*\)", q, re.DOTALL):
        return None
    m = re.fullmatch(r"query_result\s*\((.*)\)", q, re.DOTALL)
    if m:
        return m.group(1)
    return q or None


def dashboard_exprs(dashboard):
    """Return [(where, expr)] for every PromQL expression in the dashboard."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            here = where
            if isinstance(node.get("title"), str) and ("type" in node or "gridPos" in node):
                here = f'panel "{node["title"]}"'
            expr = node.get("expr")
            if isinstance(expr, str) and expr.strip():
                ref = node.get("refId")
                found.append((f"{here}, refId {ref}" if ref else here, expr))
            for key, value in node.items():
                if key != "templating":
                    walk(value, here)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    walk({k: v for k, v in dashboard.items() if k != "templating"}, "dashboard")
    for var in (dashboard.get("templating") or {}).get("list", []):
        if var.get("type") != "query":
            continue
        ds = var.get("datasource")
        ds_type = ds.get("type") if isinstance(ds, dict) else None
        if ds_type not in (None, "prometheus"):
            continue
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str):
            expr = variable_query_expr(query)
            if expr:
                found.append((f'variable "{var.get("name")}"', expr))
    return found


def exported_families(text):
    """Return {family: type} from the `# TYPE` lines of a Prometheus text exposition."""
    families = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[0] == "#" and parts[1] == "TYPE":
            families[parts[2]] = parts[3]
    return families


def check_name(name, families):
    """Return None if the name is exported, else a reason string."""
    kind = families.get(name)
    if kind is not None:
        if kind == "histogram":
            return "is a histogram family: use it with _bucket, _sum or _count"
        return None
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            base_kind = families.get(base)
            if base_kind == "histogram" or (base_kind == "summary" and suffix != "_bucket"):
                return None
            if base_kind is not None:
                return f"{base} is a {base_kind}, not a histogram"
    if name.endswith("_total") and families.get(name[: -len("_total")]) == "counter":
        return None  # OpenMetrics names the family without _total
    return "not exported"


def promtool_substitute(expr):
    """Replace Grafana variables with values that keep the expression parseable."""
    out = []
    for m in TOKEN.finditer(expr):
        kind, text = m.lastgroup, m.group()
        if kind == "str":
            text = re.sub(r"\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\]", ".*", text)
        elif kind == "var":
            name = text.strip("${}[]").split(":")[0]
            if name in ("__range_s", "__range_ms", "__interval_ms"):
                text = "300"
            elif name.startswith("__"):
                text = "5m"
            else:
                text = "1"
        out.append(text)
    return "".join(out)


def promtool_check(exprs):
    """Parse every expression with `promtool check rules`; return a list of problems."""
    promtool = shutil.which("promtool")
    if not promtool:
        print("error: --promtool given but promtool is not on the PATH", file=sys.stderr)
        sys.exit(2)
    rules = [{"record": f"dashboard:expr_{i}", "expr": promtool_substitute(e)} for i, (_, e) in enumerate(exprs)]
    doc = {"groups": [{"name": "dashboard", "rules": rules}]}
    fd, path = tempfile.mkstemp(suffix=".yml", prefix="dashboard-rules-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)  # JSON is valid YAML
        proc = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True)
    finally:
        os.unlink(path)
    if proc.returncode == 0:
        return []
    output = (proc.stdout + proc.stderr).strip()
    problems = []
    for idx in sorted({int(n) for n in re.findall(r"dashboard:expr_(\d+)", output)}):
        where, expr = exprs[idx]
        problems.append(f"{where}: promtool cannot parse: {expr}")
    if not problems:
        problems.append("promtool check rules failed:\n" + output)
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dashboard", help="Grafana dashboard JSON")
    parser.add_argument("metrics", help="raw /metrics output (Prometheus text format)")
    parser.add_argument("--promtool", action="store_true", help="also parse every expression with promtool")
    args = parser.parse_args(argv)

    try:
        with open(args.dashboard, encoding="utf-8") as f:
            dashboard = json.load(f)
        with open(args.metrics, encoding="utf-8") as f:
            families = exported_families(f.read())
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not families:
        print(f"error: {args.metrics} has no '# TYPE <name> <type>' lines; is it a /metrics scrape?", file=sys.stderr)
        return 2

    exprs = dashboard_exprs(dashboard)
    if not exprs:
        print(f"error: {args.dashboard} has no PromQL expressions", file=sys.stderr)
        return 2

    problems = []
    used = {}
    for where, expr in exprs:
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: no metric name found in: {expr}")
        for name in names:
            used.setdefault(name, []).append(where)
    unknown = {}
    for name, places in sorted(used.items()):
        reason = check_name(name, families)
        if reason:
            unknown[name] = (reason, places)

    if args.promtool:
        problems.extend(promtool_check(exprs))

    if unknown:
        print(f"{len(unknown)} metric name(s) in {args.dashboard} not exported by {args.metrics}:")
        for name, (reason, places) in unknown.items():
            print(f"  {name}: {reason} (used in {'; '.join(dict.fromkeys(places))})")
    for problem in problems:
        print(problem)
    if unknown or problems:
        return 1

    exported_base = set()
    for name in used:
        exported_base.add(name)
        for suffix in HISTOGRAM_SUFFIXES + ("_total",):
            if name.endswith(suffix):
                exported_base.add(name[: -len(suffix)])
    unused = sorted(n for n in families if n.startswith("ingest_") and n not in exported_base)
    if unused:
        print(f"note: exported but not on the dashboard: {', '.join(unused)}")
    checked = "names and promtool syntax" if args.promtool else "names"
    print(f"ok: {len(exprs)} expressions, {len(used)} metric names, all exported ({checked} checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Drives the status page (GET /) of a running gateway in headless Chromium and checks what a person would see.

Usage: status_page.py BASE_URL [OUT_DIR] [--load-seconds N]   (OUT_DIR defaults to target/status-page, N to 6)

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe), so nothing beyond Python's
standard library and the browser is needed. The script opens the page, sends updates to the gateway for a few
seconds while reading the figures the page shows, and checks that:
  - the page's own inline style and script run under its Content-Security-Policy, and nothing is refused or throws;
  - the figures appear, and change under load: the accepted count grows by what was sent, the updates/s figure
    rises above zero, refusals and written updates are counted, the chart and the last batches are drawn;
  - on a phone-sized screen nothing overflows sideways.
It leaves two screenshots in OUT_DIR (desktop and phone) and prints their paths. Exit status 0 when all holds.
"""

import argparse
import base64
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

# Safety nets only: each wait ends as soon as its condition holds.
PAGE_TIMEOUT_S = 30
PHONE_WIDTH = 390
UPDATES_PER_REQUEST = 50


class Browser:
    """A headless Chromium and its DevTools-protocol pipe: commands on fd 3, answers and events on fd 4."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="status-page-chromium-")
        command_read, self.command_write = os.pipe()
        self.answer_read, answer_write = os.pipe()

        def child_fds():
            # Moved out of the way first, so that placing one on 3 or 4 cannot close the other.
            high_in = fcntl.fcntl(command_read, fcntl.F_DUPFD, 10)
            high_out = fcntl.fcntl(answer_write, fcntl.F_DUPFD, 10)
            os.dup2(high_in, 3)
            os.dup2(high_out, 4)

        args = [
            find_chromium(),
            "--headless",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--user-data-dir=" + self.profile,
            "--remote-debugging-pipe",
            "about:blank",
        ]
        if os.geteuid() == 0:
            # Chromium's sandbox refuses to run as root; CI containers often are root.
            args.insert(2, "--no-sandbox")
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=child_fds,
        )
        os.close(command_read)
        os.close(answer_write)
        self.buffer = b""
        self.next_id = 0
        self.events = []
        self.session = None

    def close(self):
        try:
            self.call("Browser.close", session=False)
        except Exception:  # noqa: BLE001 - the browser may be gone already; it is killed below either way
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _read_message(self, deadline):
        while b"\0" not in self.buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self.answer_read, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe (did it start?)")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method, params=None, session=True, timeout=PAGE_TIMEOUT_S):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self.command_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})
            self.events.append(answer)

    def wait_event(self, method, timeout=PAGE_TIMEOUT_S):
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def open(self, url):
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.call(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, session=False
        )
        self.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.call(domain + ".enable")
        # Installed before the page's own script, so that every refusal of its policy is seen.
        self.call(
            "Page.addScriptToEvaluateOnNewDocument",
            {
                "source": "window.__violations = [];"
                "document.addEventListener('securitypolicyviolation', (e) =>"
                " window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));"
            },
        )
        self.viewport(1200, 900, 1, mobile=False)
        self.events.clear()
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def viewport(self, width, height, scale, mobile):
        self.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile},
        )

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path):
        """The whole page, however long, as a PNG."""
        height = self.evaluate("Math.ceil(document.documentElement.getBoundingClientRect().height)")
        width = self.evaluate("window.innerWidth")
        shot = self.call(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
            },
        )
        with open(path, "wb") as out:
            out.write(base64.b64decode(shot["data"]))

    def problems(self):
        """Exceptions, policy refusals and console errors seen so far, as text."""
        found = []
        for event in self.events:
            method = event.get("method")
            params = event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append("exception: " + json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Log.entryAdded":
                entry = params.get("entry", {})
                text = entry.get("text", "")
                # A missing favicon is the browser's own request, not the page's doing.
                if entry.get("level") == "error" and "favicon" not in (entry.get("url") or ""):
                    found.append("console: " + text)
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append("console.error: " + json.dumps(params.get("args"))[:500])
        found += ["policy refused: " + v for v in self.evaluate("window.__violations || []")]
        return found


def find_chromium():
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    sys.exit("chromium not found (Debian: apt-get install chromium; or set CHROMIUM)")


# The figures the page shows, read back from the DOM (data-value holds each figure's raw number).
FIGURES_JS = """(() => {
  const value = (id) => { const e = document.getElementById(id);
    return e && e.dataset.value !== undefined && e.dataset.value !== '' ? Number(e.dataset.value) : null; };
  const text = (id) => { const e = document.getElementById(id); return e ? e.textContent : null; };
  return {
    state: document.body.dataset.state || null,
    accepted: value('location-accepted'), rate: value('location-rate'), rate_text: text('location-rate'),
    written: value('location-written'), rejected: value('location-rejected'),
    queue: value('location-queue'), lag: text('location-lag'), backlog: text('location-backlog'),
    poll_accepted: value('poll-accepted'),
    chart: (document.getElementById('location-accepted-line') || {getAttribute: () => ''}).getAttribute('d'),
    batches: document.querySelectorAll('#location-batches tr:not(.empty)').length,
    wal_bytes: value('wal-bytes'), title: document.title,
    styled: getComputedStyle(document.getElementById('streams')).display,
    width: document.documentElement.scrollWidth,
  };
})()"""


def wait_for(what, condition, timeout=PAGE_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting until " + what)
        time.sleep(0.2)


def post(base, path, body):
    request = urllib.request.Request(
        base + path, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


class Load(threading.Thread):
    """Sends location updates (and now and then a poll result and a refused request) for `seconds`."""

    def __init__(self, base, seconds):
        super().__init__(daemon=True)
        self.base = base
        self.seconds = seconds
        self.accepted = 0
        self.refused = 0
        self.unexpected = []

    def run(self):
        tag = f"status-page-{os.getpid()}-{int(time.time())}"
        end = time.monotonic() + self.seconds
        i = 0
        while time.monotonic() < end:
            now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            updates = [
                {"device_id": f"{tag}-{i}-{k}", "recorded_at": now, "lat": 48.85 + k / 1e4, "lon": 2.35,
                 "speed_kmh": 42}
                for k in range(UPDATES_PER_REQUEST)
            ]
            status = post(self.base, "/api/v1/location/update", json.dumps(updates))
            if status == 202:
                self.accepted += UPDATES_PER_REQUEST
            else:
                self.unexpected.append(status)
            if i % 10 == 0:
                poll = {"project_id": 1 + i, "polled_at": now, "success": True, "status_code": 200}
                if post(self.base, "/api/v1/poll/update", json.dumps(poll)) != 202:
                    self.unexpected.append("poll")
                # One refused update, so that the page has a refusal to show.
                if post(self.base, "/api/v1/location/update", '{"device_id":"x","lat":91}') == 422:
                    self.refused += 1
            i += 1
            time.sleep(0.02)


def check_headers(base):
    with urllib.request.urlopen(base + "/", timeout=10) as response:
        kind = response.headers.get("Content-Type", "")
        policy = response.headers.get("Content-Security-Policy", "")
    assert kind.startswith("text/html"), kind
    assert "default-src 'none'" in policy and "'unsafe-inline'" not in policy, policy
    try:
        urllib.request.urlopen(base + "/index.html", timeout=10)
        raise AssertionError("/index.html should be 404")
    except urllib.error.HTTPError as error:
        assert error.code == 404 and json.load(error)["error"] == "not_found"
    return policy


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base_url")
    parser.add_argument("out_dir", nargs="?", default=os.path.join("target", "status-page"))
    parser.add_argument("--load-seconds", type=float, default=6, help="how long to send updates (default 6)")
    options = parser.parse_args()
    base = options.base_url.rstrip("/")
    out_dir = options.out_dir
    os.makedirs(out_dir, exist_ok=True)
    policy = check_headers(base)
    print(f"GET / is HTML with Content-Security-Policy: {policy}")

    browser = Browser()
    try:
        browser.open(base + "/")
        figures = lambda: browser.evaluate(FIGURES_JS)  # noqa: E731
        before = wait_for(
            "the page shows live figures",
            lambda: (lambda f: f if f["state"] == "ok" and f["accepted"] is not None else None)(figures()),
        )
        assert before["styled"] == "grid", f"the page's inline style did not apply: {before['styled']}"
        print(f"before the load: {before}")

        load = Load(base, options.load_seconds)
        load.start()
        peak_rate = 0.0
        while load.is_alive():
            f = figures()
            peak_rate = max(peak_rate, f["rate"] or 0.0)
            time.sleep(0.5)
        load.join()
        assert not load.unexpected, f"unexpected answers while loading: {load.unexpected[:10]}"
        print(f"sent {load.accepted} location updates (202) and {load.refused} refused ones")

        after = wait_for(
            "the page shows every accepted update and some written",
            lambda: (
                lambda f: f
                if f["accepted"] >= before["accepted"] + load.accepted
                and f["written"] > before["written"]
                and f["batches"] > 0
                else None
            )(figures()),
        )
        print(f"after the load: {after}")
        assert after["state"] == "ok", after
        assert peak_rate > 0, "the updates/s figure never rose above 0 under load"
        assert after["rejected"] >= before["rejected"] + load.refused, "refusals are shown"
        assert (after["poll_accepted"] or 0) > (before["poll_accepted"] or 0), "the poll stream is shown"
        assert after["chart"] and after["chart"].count("L") >= 2, f"the chart has a line: {after['chart']!r}"
        assert "updates/s" in after["title"], after["title"]
        print(f"peak updates/s shown: {peak_rate:.0f}")

        desktop = os.path.join(out_dir, "status-page.png")
        browser.screenshot(desktop)

        browser.viewport(PHONE_WIDTH, 844, 2, mobile=True)
        time.sleep(1.5)
        phone = figures()
        # A page wider than the screen widens a mobile layout viewport: compare with the screen, not innerWidth.
        assert phone["width"] <= PHONE_WIDTH, f"the page is {phone['width']} px wide on a {PHONE_WIDTH} px phone"
        phone_shot = os.path.join(out_dir, "status-page-phone.png")
        browser.screenshot(phone_shot)

        problems = browser.problems()
        assert not problems, "the page had problems:\n" + "\n".join(problems)
        print(f"screenshots: {desktop} {phone_shot}")
    finally:
        browser.close()
    print("status page: ok")


if __name__ == "__main__":
    main()

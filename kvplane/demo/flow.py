"""The demo's steps: the seeds' flows against a real controller and two real servers.

1. start a controller and two ``kvplane serve`` instances (instance-a, instance-b) on free
   loopback ports, each with ``enable_controller``; wait for the models and the workers;
2. two completions that share a long prefix on instance-a: time to first token of each;
3. ``/tokenize`` -> controller ``/lookup``: which instance holds the prompt, in which tier,
   how many leading tokens; the same for an unseen prompt with the shared prefix;
4. ``/query_worker_info`` of instance-a and the cluster as ``kvplane status`` shows it;
5. ``/clear`` it and look up again; 6. stop every child by PID and check that none is left;
7. a summary table: each step and what it showed.
"""

from __future__ import annotations

import functools
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from kvplane.children import Children, free_ports
from kvplane.demo.output import Printer
from kvplane.errors import Unavailable
from kvplane.text_table import format_table

__all__ = ["DemoOptions", "DemoReport", "run_demo"]

T = TypeVar("T")
HOST = "127.0.0.1"
INSTANCES = ("instance-a", "instance-b")
LOCATION = "LocalCPUBackend"
CHUNK_SIZE = 256


class DemoOptions(NamedTuple):
    workdir: Path
    prefix_tokens: int = 3000
    with_controller: bool = True
    ready_timeout_s: float = 300.0  # model loads on a busy 2-core machine take minutes


class DemoReport(NamedTuple):
    ttft_first_s: float
    ttft_second_s: float
    cached_tokens_second: int
    lookup: dict[str, Any]  # the controller's layout_info for the first prompt
    worker_infos: list[dict[str, Any]]
    cleared_tokens: int | None
    exit_codes: list[tuple[str, int | None]]
    summary: list[tuple[str, str]]  # (step, what it showed), as printed at the end


class _Ports(NamedTuple):
    controller: int
    pull: int
    reply: int
    serve: dict[str, int]
    worker: dict[str, int]
    p2p: dict[str, int]
    api: dict[str, int]  # internal API server port_start (it uses port_start and +1)


def _http(method: str, url: str, body: Any = None, timeout: float = 60.0) -> tuple[Any, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            text = reply.read().decode()
            return (json.loads(text) if text else None), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        raise Unavailable(f"{method} {url} -> {exc.code}: {exc.read().decode()[:500]}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Unavailable(f"{method} {url} failed: {exc}") from None


def _post(url: str, body: Any) -> Any:
    return _http("POST", url, body)[0]


def _poll(check: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Unavailable as exc:
            last = exc
        time.sleep(0.2)
    raise Unavailable(f"timed out after {timeout:.0f}s waiting for {what}; last error: {last}")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_ports() -> _Ports:
    """Free ports for everything; each internal API server needs two adjacent ones."""
    n = len(INSTANCES)
    p = free_ports(3 + 3 * n)
    taken = set(p)
    api: dict[str, int] = {}
    for name in INSTANCES:
        for _ in range(100):
            (start,) = free_ports(1)
            pair = {start, start + 1}
            if not pair & taken and _bindable(start + 1):
                api[name] = start
                taken |= pair
                break
        else:
            raise Unavailable("could not find two adjacent free loopback ports")
    return _Ports(
        controller=p[0],
        pull=p[1],
        reply=p[2],
        serve={name: p[3 + i] for i, name in enumerate(INSTANCES)},
        worker={name: p[3 + n + i] for i, name in enumerate(INSTANCES)},
        p2p={name: p[3 + 2 * n + i] for i, name in enumerate(INSTANCES)},
        api=api,
    )


def _instance_yaml(name: str, ports: _Ports, with_controller: bool) -> str:
    return "\n".join(
        [
            f"chunk_size: {CHUNK_SIZE}",
            "local_cpu: true",
            "max_local_cpu_size: 0.25",
            f"enable_controller: {str(with_controller).lower()}",
            f'lmcache_instance_id: "{name}"',
            f'controller_pull_url: "{HOST}:{ports.pull}"',
            f'controller_reply_url: "{HOST}:{ports.reply}"',
            f"lmcache_worker_ports: {ports.worker[name]}",
            "lmcache_worker_heartbeat_time: 1",
            f'p2p_host: "{HOST}"',
            f"p2p_init_ports: {ports.p2p[name]}",
            "internal_api_server_enabled: true",
            f"internal_api_server_port_start: {ports.api[name]}",
            "",
        ]
    )


def _serve_env(cfg: Path) -> dict[str, str]:
    # One intra-op thread per instance: two instances and a controller share a small box,
    # and oversubscribed OpenMP threads spin instead of working.
    return {"LMCACHE_CONFIG_FILE": str(cfg), "OMP_NUM_THREADS": "1"}


def _prompts(prefix_tokens: int) -> tuple[str, str, str]:
    sentence = (
        "Section {i}: a transformer's KV cache keeps the attention keys and values of every "
        "earlier token, so a request that shares this prefix does not prefill it again. "
    )
    doc = "".join(sentence.format(i=i) for i in range(prefix_tokens // 100 + 2))[:prefix_tokens]
    return (
        doc + "\nQuestion: what does the KV cache hold?\nAnswer:",
        doc + "\nQuestion: why is the first token faster the second time?\nAnswer:",
        doc + "\nQuestion: which instance should serve this prompt?\nAnswer:",
    )


class _Demo:
    def __init__(self, options: DemoOptions, out: Printer, children: Children) -> None:
        self.options = options
        self.out = out
        self.children = children
        self.ports = _pick_ports()
        self.controller = f"http://{HOST}:{self.ports.controller}"
        self.summary: list[tuple[str, str]] = []

    def serve_url(self, name: str) -> str:
        return f"http://{HOST}:{self.ports.serve[name]}"

    # ------------------------------------------------------------------ start-up
    def start(self) -> None:
        ports, out = self.ports, self.out
        if self.options.with_controller:
            monitor = json.dumps({"pull": ports.pull, "reply": ports.reply})
            args = ["controller", "--host", HOST, "--port", str(ports.controller)]
            self.children.start("controller", [*args, "--monitor-ports", monitor])
            out.step(
                f"controller on {HOST}:{ports.controller} (pull {ports.pull}, reply {ports.reply})"
            )
        for name in INSTANCES:
            cfg = self.options.workdir / f"{name}.yaml"
            cfg.write_text(_instance_yaml(name, ports, self.options.with_controller))
            port = str(ports.serve[name])
            self.children.start(name, ["serve", "--host", HOST, "--port", port], _serve_env(cfg))
            out.step(f"{name}: kvplane serve on {HOST}:{port} (config {cfg.name})")
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.options.ready_timeout_s
        ready: set[str] = set()
        shown = ""
        while len(ready) < len(INSTANCES) + int(self.options.with_controller):
            self.children.check_alive()
            if time.monotonic() > deadline:
                raise Unavailable(f"not ready after {self.options.ready_timeout_s:.0f}s: {shown}")
            if self.options.with_controller and _port_open(self.ports.controller):
                ready.add("controller")
            for name in INSTANCES:
                if name not in ready and self._healthy(name):
                    ready.add(name)
            names = (["controller"] if self.options.with_controller else []) + list(INSTANCES)
            state = "  ".join(f"{n} {'ready' if n in ready else 'loading...'}" for n in names)
            if state != shown or self.out.is_tty:
                self.out.progress(state)
                shown = state
            time.sleep(0.3)
        if self.options.with_controller:
            for name in INSTANCES:
                _poll(
                    functools.partial(self._worker_infos, name), 30, f"{name}'s worker to register"
                )
            self.out.step("both workers registered with the controller")
        started = "controller + " if self.options.with_controller else ""
        self.summary.append(
            (
                "start-up",
                f"{started}{len(INSTANCES)} servers ready after {self.out.elapsed():.1f} s",
            )
        )

    def _healthy(self, name: str) -> bool:
        try:
            _http("GET", f"{self.serve_url(name)}/health", timeout=2)
            return True
        except Unavailable:
            return False

    def _worker_infos(self, name: str) -> list[dict[str, Any]]:
        body = {"instance_id": name, "worker_ids": [0]}
        return list(_post(f"{self.controller}/query_worker_info", body)["worker_infos"])

    # ------------------------------------------------------------------ the flows
    def complete(self, name: str, prompt: str, max_tokens: int = 8) -> tuple[dict, float]:
        body = {"model": "demo", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        reply, headers = _http("POST", f"{self.serve_url(name)}/v1/completions", body)
        ttft = float({k.lower(): v for k, v in headers.items()}["x-kvplane-ttft-s"])
        return reply, ttft

    def lookup(self, tokens: list[int]) -> dict[str, Any]:
        return dict(_post(f"{self.controller}/lookup", {"tokens": tokens})["layout_info"])

    def run(self) -> DemoReport:
        out = self.out
        first, second, unseen = _prompts(self.options.prefix_tokens)
        for name in INSTANCES:  # one short request each: warms up the process
            self.complete(name, f"Hello from {name}.", 2)
        a = INSTANCES[0]
        out.step(f"two completions on {a} sharing a {self.options.prefix_tokens}-token prefix")
        r1, t1 = self.complete(a, first)
        r2, t2 = self.complete(a, second)
        rows = []
        for label, reply, ttft in (("first", r1, t1), ("second", r2, t2)):
            usage = reply["usage"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            rows.append(
                [
                    label,
                    usage["prompt_tokens"],
                    cached,
                    f"{ttft * 1000:.1f} ms",
                    usage["completion_tokens"],
                ]
            )
        out.block(
            format_table(
                ["request", "prompt tokens", "cached", "time to first token", "output tokens"], rows
            )
        )
        out.block(f"    -> first token {t1 / max(t2, 1e-9):.1f}x sooner with the cached prefix")
        self.summary += [
            ("first completion", f"{rows[0][1]} prompt tokens, TTFT {rows[0][3]}"),
            (
                "second completion",
                f"{rows[1][2]} of {rows[1][1]} tokens cached, TTFT {rows[1][3]} "
                f"({t1 / max(t2, 1e-9):.1f}x sooner)",
            ),
        ]

        layout: dict[str, Any] = {}
        infos: list[dict[str, Any]] = []
        cleared: int | None = None
        if self.options.with_controller:
            layout = self._show_lookup(a, first, unseen)
            infos = self._show_worker_info(a)
            self._show_status()
            cleared = self._show_clear(a, first)
        else:
            out.step("controller steps skipped (--no-controller)")
        codes = self._shutdown()
        out.block("\nsummary")
        out.block(format_table(["step", "result"], self.summary))
        return DemoReport(
            t1,
            t2,
            r2["usage"]["prompt_tokens_details"]["cached_tokens"],
            layout,
            infos,
            cleared,
            codes,
            self.summary,
        )

    def _tokenize(self, name: str, prompt: str) -> list[int]:
        body = {"model": "demo", "prompt": prompt}
        return list(_post(f"{self.serve_url(name)}/tokenize", body)["tokens"])

    def _show_lookup(self, a: str, first: str, unseen: str) -> dict[str, Any]:
        out = self.out
        tokens = self._tokenize(a, first)
        out.step(f"/tokenize the first prompt on {a}: {len(tokens)} tokens -> controller /lookup")

        def whole_prompt_seen() -> dict[str, Any] | None:
            got = self.lookup(tokens)
            return got if got.get(a, [None, 0])[1] == len(tokens) else None

        # The worker reports new chunks in batches: the controller may lag a moment.
        layout = _poll(whole_prompt_seen, 15, "the controller to see the first prompt")
        rows = [[inst, loc, f"{n} of {len(tokens)}"] for inst, (loc, n) in sorted(layout.items())]
        missing = [n for n in INSTANCES if n not in layout]
        out.block(format_table(["instance", "location", "matched prefix"], rows))
        if missing:
            out.block(f"    ({', '.join(missing)}: none of it)")
        other = self._tokenize(a, unseen)
        seen = self.lookup(other)
        out.step(f"an unseen prompt with the same prefix ({len(other)} tokens) -> /lookup")
        rows = [[inst, loc, f"{n} of {len(other)}"] for inst, (loc, n) in sorted(seen.items())]
        out.block(format_table(["instance", "location", "matched prefix"], rows))
        out.block(
            f"    -> route it to {a}: whole {CHUNK_SIZE}-token chunks of its prefix are cached"
        )
        where = ", ".join(
            f"{i} {loc} {n} of {len(tokens)}" for i, (loc, n) in sorted(layout.items())
        )
        near = ", ".join(f"{i} {n} of {len(other)}" for i, (_, n) in sorted(seen.items()))
        self.summary += [
            ("/lookup first prompt", where or "no instance"),
            ("/lookup unseen prompt", near or "no instance"),
        ]
        return layout

    def _show_worker_info(self, a: str) -> list[dict[str, Any]]:
        infos = self._worker_infos(a)
        self.out.step(f"/query_worker_info {a}")
        rows = [
            [
                w["worker_id"],
                f"{w['ip']}:{w['port']}",
                w["peer_init_url"],
                time.strftime("%H:%M:%S", time.localtime(float(w["registration_time"]))),
                time.strftime("%H:%M:%S", time.localtime(float(w["last_heartbeat_time"]))),
            ]
            for w in infos
        ]
        self.out.block(
            format_table(
                ["worker", "command address", "peer init url", "registered", "last heartbeat"], rows
            )
        )
        self.summary.append(("/query_worker_info", f"{a}: {len(infos)} worker(s) registered"))
        return infos

    def _show_status(self) -> None:
        from kvplane.status_cli import fetch_status, render

        self.out.step(f"kvplane status --controller {self.controller}")
        status = fetch_status(self.controller, timeout=10)
        self.out.block(render(status, self.controller).rstrip("\n"))
        t = status.totals
        self.summary.append(
            ("kvplane status", f"{t.instances} instances, {t.workers} workers, {t.chunks} chunks")
        )

    def _show_clear(self, a: str, first: str) -> int:
        reply = _post(f"{self.controller}/clear", {"instance_id": a, "location": LOCATION})
        cleared = int(reply["num_tokens"])
        tokens = self._tokenize(a, first)
        _poll(lambda: a not in self.lookup(tokens), 15, f"the controller to forget {a}'s chunks")
        self.out.step(
            f"/clear {a} {LOCATION}: {cleared} tokens cleared; /lookup now finds nothing there"
        )
        self.summary.append(("/clear", f"{a} {LOCATION}: {cleared} tokens cleared"))
        return cleared

    def _shutdown(self) -> list[tuple[str, int | None]]:
        codes = self.children.stop_all()
        left = [c.name for c in self.children.children if not c.exited()]
        status = ", ".join(f"{n} (exit {code})" for n, code in codes)
        self.out.step(f"stopped {status}; {'no process left' if not left else f'LEFT: {left}'}")
        if left:
            raise Unavailable(f"children still running: {left}")
        self.summary.append(("shutdown", f"{len(codes)} processes stopped, none left"))
        return codes


def run_demo(options: DemoOptions, out: Printer | None = None) -> DemoReport:
    """Run every step; children are stopped by PID whatever happens."""
    printer = out or Printer()
    with Children(options.workdir) as children:
        demo = _Demo(options, printer, children)
        demo.start()
        return demo.run()

#!/usr/bin/env python3
"""What do WebSockets held across pushes cost Caddy in memory?

caddy-fleet gives every generated reverse_proxy a stream_close_delay
(STREAM_CLOSE_DELAY, default 1h): a push then no longer closes WebSockets,
and Caddy keeps each unloaded config alive as long as one of its streams
is open. This starts Caddy (CADDY_BIN), a WebSocket echo server on
loopback, opens N WebSockets through Caddy to one site, then pushes P
configs the way the applier does (a whole config per change, one unrelated
site added each time), and prints Caddy's RSS before and after, and how
many WebSockets are still open — once with the delay, once without.

  CADDY_BIN=/path/to/caddy python3 benches/ws_memory.py --clients 1000 --pushes 100
"""
import argparse, asyncio, json, os, subprocess, sys, tempfile, time, urllib.request
import websockets

ADMIN, HTTP, ECHO = 23019, 23080, 23001


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def caddyfile(delay, others):
    proxy = f"reverse_proxy 127.0.0.1:{ECHO}"
    if delay:
        proxy += f" {{\n\t\tstream_close_delay {delay}\n\t}}"
    sites = [f"http://ws.bench.test {{\n\t{proxy}\n}}"]
    sites += [f"http://o{i}.bench.test {{\n\trespond ok\n}}" for i in range(others)]
    return f"{{\n\tadmin 127.0.0.1:{ADMIN}\n\thttp_port {HTTP}\n\tauto_https off\n}}\n" + "\n".join(sites) + "\n"


def load(text):
    req = urllib.request.Request(f"http://127.0.0.1:{ADMIN}/load", data=text.encode(),
                                 headers={"Content-Type": "text/caddyfile"}, method="POST")
    urllib.request.urlopen(req, timeout=30).read()


async def echo(ws):
    async for m in ws:
        await ws.send(m)


async def run(delay, clients, pushes, caddy_bin):
    tmp = tempfile.mkdtemp()
    base = os.path.join(tmp, "Caddyfile")
    open(base, "w").write(caddyfile(delay, 0))
    caddy = subprocess.Popen([caddy_bin, "run", "--config", base, "--adapter", "caddyfile"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/config/", timeout=1).read()
                break
            except Exception:
                await asyncio.sleep(0.1)  # Caddy not listening yet: poll again
        server = await websockets.serve(echo, "127.0.0.1", ECHO)
        sockets = []
        for i in range(clients):
            ws = await websockets.connect(f"ws://ws.bench.test:{HTTP}/", host="127.0.0.1", port=HTTP,
                                          open_timeout=10, ping_interval=None)
            sockets.append(ws)
        rss_open = rss_mib(caddy.pid)
        started = time.monotonic()
        for p in range(pushes):
            load(caddyfile(delay, p + 1))
        took = time.monotonic() - started
        # /load returns before the old servers are stopped; RSS is read after
        # a second, a measurement delay, not a wait for a condition.
        await asyncio.sleep(1)
        rss_pushed = rss_mib(caddy.pid)
        alive = 0
        for ws in sockets:
            try:
                await ws.send("x")
                await asyncio.wait_for(ws.recv(), 2)
                alive += 1
            except Exception:
                pass
        for ws in sockets:
            await ws.close()
        server.close()
        return {"stream_close_delay": delay or "none", "websockets": clients, "pushes": pushes,
                "caddy_rss_mib_open": round(rss_open, 1), "caddy_rss_mib_after_pushes": round(rss_pushed, 1),
                "still_open": alive, "pushes_s": round(took, 2)}
    finally:
        caddy.terminate()
        caddy.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--pushes", type=int, default=100)
    a = ap.parse_args()
    caddy_bin = os.environ.get("CADDY_BIN", "caddy")
    for delay in ("1h", None):
        print(json.dumps(asyncio.run(run(delay, a.clients, a.pushes, caddy_bin))))


if __name__ == "__main__":
    sys.exit(main())

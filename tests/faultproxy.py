"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a real server (moto): passes requests through, or
answers 503 to some methods, or accepts connections and never answers (a hung server), or loses the last byte of
every upload on its way (a body that does not arrive intact). Tests switch `mode`; `requests` lists what came."""

from __future__ import annotations

import http.client
import http.server
import threading
import urllib.parse


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        # pass | fail_put (503 to PUT and POST) | hang (read the request, never answer) | truncate_put (PUT bodies lose
        # their last byte before they reach the server, which answers as if all was well)
        self.mode = "pass"
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.released = threading.Event()  # set at close: hung handlers return
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                proxy.requests.append((self.command, self.path))
                if proxy.mode == "hang":
                    proxy.released.wait(120)  # bounded: the test closes the proxy long before
                    self.close_connection = True
                    return
                if proxy.mode == "fail_put" and self.command in ("PUT", "POST"):
                    payload = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                if proxy.mode == "truncate_put" and self.command == "PUT" and body:
                    body = body[:-1]
                    headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

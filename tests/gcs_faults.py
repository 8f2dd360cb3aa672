"""A real HTTP proxy between gcsfs and the GCS emulator that answers chosen
requests with an error status (or drops their connection), so gcsfs meets
genuine 5xx / 401 / 403 responses and dropped connections.

  proxy = FaultProxy(emulator_url)          # started, on 127.0.0.1
  os.environ["STORAGE_EMULATOR_HOST"] = proxy.url
  proxy.fail(503, "a.jsonl.zst")            # every request naming it, from now
  proxy.clear()                             # all requests pass again
  proxy.count("GET", "tokenizer.model")     # requests seen, faulted or not

Error bodies are what GCS sends: {"error": {"code": N, "message": ...}}.
"""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import urllib.parse

DROP = 0  # status meaning: close the connection without an answer

MESSAGES = {
    401: "Anonymous caller does not have storage.objects.get access to the Google Cloud "
         "Storage object.",
    403: "test@example.iam.gserviceaccount.com does not have storage.objects.get access "
         "to the Google Cloud Storage object. Permission 'storage.objects.get' denied on "
         "resource (or it may not exist).",
    429: "The rate of change requests to the object is too high.",
    503: "We encountered an internal error. Please try again.",
}


class FaultProxy:
  """Forwards every request to `upstream` (http://HOST:PORT) unless a fault
  matches it: `fail(status, contains, method)` answers requests whose method
  and unquoted path+query match with `status` (DROP: no answer)."""

  def __init__(self, upstream: str):
    self.upstream = urllib.parse.urlparse(upstream).netloc
    self._lock = threading.Lock()
    self._fault: tuple[int, str, str | None] | None = None
    self.requests: list[tuple[str, str]] = []  # (method, unquoted path and query)
    handler = type("Handler", (_Handler,), {"proxy": self})
    self._server = _Server(("127.0.0.1", 0), handler)
    self._server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

  def fail(self, status: int, contains: str, method: str | None = None) -> None:
    with self._lock:
      self._fault = (status, contains, method)

  def clear(self) -> None:
    with self._lock:
      self._fault = None

  def count(self, method: str, contains: str) -> int:
    with self._lock:
      return sum(m == method and contains in p for m, p in self.requests)

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()

  def _fault_for(self, method: str, path: str) -> int | None:
    with self._lock:
      self.requests.append((method, path))
      if self._fault is None:
        return None
      status, contains, only = self._fault
      return status if contains in path and only in (None, method) else None


class _Server(http.server.ThreadingHTTPServer):

  def handle_error(self, request, client_address) -> None:  # a client that hung up
    pass


class _Handler(http.server.BaseHTTPRequestHandler):
  proxy: FaultProxy
  protocol_version = "HTTP/1.1"

  def log_message(self, *args) -> None:  # quiet
    pass

  def _body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      chunks = []
      while True:
        size = int(self.rfile.readline().split(b";")[0], 16)
        chunk = self.rfile.read(size + 2)[:size]  # and its CRLF
        if not size:
          break
        chunks.append(chunk)
      return b"".join(chunks)
    return self.rfile.read(int(self.headers.get("Content-Length") or 0))

  def _handle(self) -> None:
    body = self._body()
    status = self.proxy._fault_for(self.command, urllib.parse.unquote(self.path))  # pylint: disable=protected-access
    if status == DROP:
      self.close_connection = True
      self.connection.shutdown(2)  # socket.SHUT_RDWR
      return
    if status is not None:
      self._answer(status, {"Content-Type": "application/json"}, json.dumps(
          {"error": {"code": status, "message": MESSAGES.get(status, "error")}}).encode())
      return
    conn = http.client.HTTPConnection(self.proxy.upstream, timeout=60)
    try:
      headers = {k: v for k, v in self.headers.items()
                 if k.lower() not in ("transfer-encoding", "connection", "content-length")}
      conn.request(self.command, self.path, body=body if body or self.command in (
          "POST", "PUT", "PATCH") else None, headers=headers)
      response = conn.getresponse()
      data = response.read()
      out = {k: v for k, v in response.getheaders()
             if k.lower() not in ("transfer-encoding", "connection", "content-length")}
      self._answer(response.status, out, data)
    finally:
      conn.close()

  def _answer(self, status: int, headers: dict, data: bytes) -> None:
    self.send_response(status)
    for k, v in headers.items():
      self.send_header(k, v)
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(data)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

"""classify.py --serve: a page to try the classifier (page.html) and a small
JSON API, on the standard library's http.server."""
import base64
import contextlib
import errno
import hashlib
import http.server
import ipaddress
import json
import re
import socket
import sys
import threading
from pathlib import Path
from beyond.cli import InputError, port_number
from beyond.explain import MAX_EXPLAINED, explain_texts
from beyond.stream import NonFiniteLogits, classify_texts, predicted_class, result_record


MAX_BODY = 1_000_000     # bytes of one /classify request
MAX_TEXTS = 1_000        # messages in one /classify request
TIMEOUT = 10.0           # seconds a client may stay silent before its connection is dropped
MAX_CONNECTIONS = 128    # connections served at a time; more are answered 503
REQUEST_DEADLINE = 30.0  # seconds a client has to send its whole request
MAX_DRAIN = 16_000_000   # bytes of an unread body read and dropped after an error answer
# The page at /: one text box, a button, a bar per class; inline, nothing to fetch.
PAGE = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")
# the CSP sources of the page's inline <script> and <style> (their sha256): nothing else runs
INLINE = {tag: " ".join(
    f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"
    for text in re.findall(rf"<{tag}>(.*?)</{tag}>", PAGE, re.S)) for tag in ("script", "style")}
# Sent with every answer: the page runs only its own inline script and style,
# talks only to this server, and no other site may frame it or sniff a type.
SECURITY_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; script-src {INLINE['script']}; "
                               f"style-src {INLINE['style']}; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def names_this_server(host_header, names):
    """Whether a Host header ("name:port", "[v6 address]:port") names this server:
    an IP address or one of `names`. A DNS-rebinding page can only send a domain
    name of its own. The port is not checked: a tunnel or port mapping changes it."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::\d*)?|([^:\[\]]+)(?::\d*)?",
                         (host_header or "").strip())
    if not match:
        return False
    name = (match[1] or match[2]).lower().rstrip(".")
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(name) is not None  # an IP address: ValueError if not
    return name in names


class RequestError(Exception):
    """A request not answered 200: RequestError(HTTP status, the JSON error's message)."""


def parse_request(body):
    """(texts, explain) of a /classify body {"texts": [...], "explain": false}."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested too deep
        raise RequestError(400, "the body is not JSON") from None
    texts = request.get("texts") if isinstance(request, dict) else None
    if not isinstance(texts, list) or not texts:
        raise RequestError(400, 'expected {"texts": ["a message", ...]} with at least one text')
    if len(texts) > MAX_TEXTS:
        raise RequestError(413, f"{len(texts):,} texts; at most {MAX_TEXTS:,} per request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(400, f"texts[{i}] is not a string")
        if not text.strip():
            raise RequestError(400, f"texts[{i}] is empty or only whitespace")
    explain = request.get("explain", False)
    if not isinstance(explain, bool):
        raise RequestError(400, '"explain" is not true or false')
    if explain and len(texts) > MAX_EXPLAINED:
        raise RequestError(413, f"{len(texts):,} texts to explain; at most {MAX_EXPLAINED} "
                                f"per request")
    return texts, explain


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection's request (HTTP/1.0: one a connection): the page, /info, /classify."""
    routes = {"/": "GET", "/info": "GET", "/classify": "POST"}
    busy = False  # True: the server is at its connection cap; answer 503
    body_read = False

    def answer(self, status, body):  # body: the page, or what is sent as JSON
        kind = "text/html" if isinstance(body, str) else "application/json"
        data = (body if kind == "text/html" else json.dumps(body, allow_nan=False)).encode()
        self.send_response(status)
        self.send_header("Content-Type", f"{kind}; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        if status == 405:
            self.send_header("Allow", "GET, HEAD" if self.routes[self.path] == "GET"
                             else self.routes[self.path])
        self.end_headers()
        if self.command != "HEAD":  # HEAD: GET's headers, no body
            self.wfile.write(data)

    def setup(self):
        self.timeout = self.server.client_timeout  # set on the socket: a silent client is dropped
        super().setup()
        # the timeout bounds each read; a client trickling a byte at a time
        # would still hold its connection, and a slot, for ever without this
        self.request_timer = threading.Timer(self.server.deadline, self.cut)
        self.request_timer.daemon = True
        self.request_timer.start()

    def cut(self):
        with contextlib.suppress(OSError):  # already closed
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self):
        self.request_timer.cancel()
        super().finish()

    def route(self, method):
        self.path = self.path.split("?", 1)[0]  # the page may be opened as /?anything
        try:
            self.check(method)
            body = self.read_body() if method == "POST" else None
            self.request_timer.cancel()  # the request is in: the answer may take its time
            if self.path == "/classify":
                self.answer(200, {"results": self.server.classify(*parse_request(body))})
            else:
                self.answer(200, PAGE if self.path == "/" else self.server.description)
        except RequestError as e:
            self.answer(e.args[0], {"error": e.args[1]})
            self.linger()

    def check(self, method):
        """RequestError unless this server takes this request from this client."""
        if self.busy:
            raise RequestError(503, "the server is answering as many connections as it "
                                    "takes at a time; try again in a moment")
        host = self.headers.get("Host")
        if not names_this_server(host, self.server.host_names):
            raise RequestError(403, f"the Host header {host!r} does not name this server")
        if self.path not in self.routes:
            raise RequestError(404, f"no such page: {self.path}")
        if self.routes[self.path] != method:
            raise RequestError(405, f"{self.path} takes {self.routes[self.path]}")
        if method == "POST":  # what another site's page could make a browser send
            origin = self.headers.get("Origin")
            if origin is not None and origin.lower() != f"http://{host}".lower():
                raise RequestError(403, f"a page of {origin} may not use this server")
            if self.headers.get_content_type() != "application/json":
                raise RequestError(415, "the body must be sent as Content-Type: application/json")

    def read_body(self):
        if "Transfer-Encoding" in self.headers:  # chunked: not read here
            raise RequestError(411, "send the body with a Content-Length, not a Transfer-Encoding")
        lengths = set(self.headers.get_all("Content-Length") or [])
        if len(lengths) != 1 or not re.fullmatch(r"[0-9]+", next(iter(lengths)).strip()):
            raise RequestError(400, "the request has no valid Content-Length")
        length = int(next(iter(lengths)))
        if length > MAX_BODY:
            raise RequestError(413, f"the body has {length:,} bytes; at most {MAX_BODY:,}")
        self.body_read = True
        return self.rfile.read(length)

    def linger(self):
        """Drops the unread body after an error answer: closing with unread data
        resets the connection, and a client still sending would never see the answer."""
        if self.body_read or (self.headers.get("Content-Length", "0") == "0"
                              and "Transfer-Encoding" not in self.headers):
            return
        self.connection.shutdown(socket.SHUT_WR)  # the answer is complete
        left = MAX_DRAIN
        while left > 0 and (chunk := self.rfile.read1(min(left, 65536))):
            left -= len(chunk)

    def send_error(self, code, message=None, explain=None):
        # http.server's own errors (a malformed request line, an unknown method), in JSON
        self.answer(code, {"error": message or http.HTTPStatus(code).phrase})

    def do_GET(self):  # HEAD: as GET; other methods: 405 where the page exists
        self.route("GET" if self.command == "HEAD" else self.command)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def log_message(self, *args):  # the terminal shows the address, not every request
        pass


class ClassifierServer(http.server.HTTPServer):
    """http.server with a thread per connection, at most max_connections at a time
    (the others are answered 503), and no traceback when a client goes away."""
    request_queue_size = 128  # socketserver's 5 resets connections in a burst

    def __init__(self, address, family, settings, max_connections):
        self.address_family = family
        # classify(texts, explain) -> results; description: /info; timeout, deadline: seconds
        self.classify, self.description, self.client_timeout, self.deadline = settings
        self.connections = threading.BoundedSemaphore(max_connections)
        self.busy_handler = type("BusyHandler", (Handler,), {"busy": True})
        super().__init__(address, Handler)
        # the names, besides IP addresses, that a Host header may give this server
        names = {"localhost", address[0], self.server_name}
        if address[0] in ("0.0.0.0", "::"):  # every interface: the machine's own name too
            names.add(socket.gethostname())
        self.host_names = {name.lower().rstrip(".") for name in names}

    def process_request(self, request, client_address):
        # counted here, in the order the connections arrived
        handler = self.RequestHandlerClass if self.connections.acquire(blocking=False) \
            else self.busy_handler
        threading.Thread(target=self.process_connection, daemon=True,
                         args=(request, client_address, handler)).start()

    def process_connection(self, request, client_address, handler):
        try:
            handler(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            if handler is self.RequestHandlerClass:
                self.connections.release()
            self.shutdown_request(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, socket.timeout)):
            super().handle_error(request, client_address)  # a bug: its traceback


def make_server(host, port, classify, description, timeout=TIMEOUT, deadline=REQUEST_DEADLINE,
                max_connections=MAX_CONNECTIONS):
    """The server of --serve on host and port (IPv4 or IPv6, as the host's address is)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as e:
        raise InputError(f"cannot listen on {host}: {e.strerror}. --host takes an address "
                         f"or name of this machine: 127.0.0.1, ::1, 0.0.0.0 or ::.") from None
    try:
        return ClassifierServer((host, port), family, (classify, description, timeout, deadline),
                                max_connections)
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            raise InputError(f"cannot listen on {host} port {port}: {e.strerror or e}. Choose "
                             f"another with --port (0 lets the system pick a free one).") \
                from None
        raise InputError(f"cannot listen on {host}: {e.strerror or e}. --host takes an "
                         f"address of this machine: 127.0.0.1, ::1, 0.0.0.0 or ::.") from None


def classifier(model, info, device, checkpoint, tokenizer):
    """classify(texts, explain) -> result records; one request at a time uses the model."""
    lock = threading.Lock()

    def classify(texts, explain):
        with lock:
            try:
                probabilities = classify_texts(texts, model, tokenizer, device,
                                               info["max_length"], info["pad_token_id"],
                                               temperature=info["temperature"])
            except NonFiniteLogits as e:  # the name only: a client is not told paths
                raise RequestError(500, f"{Path(checkpoint).name}: {e}") from None
            targets = [predicted_class(p) for p in probabilities]
            explanations = explain_texts(texts, targets, model, tokenizer, info["max_length"],
                                         info["pad_token_id"]) if explain else [None] * len(texts)
        return [result_record(t, p, info["labels"], explanation=e)
                for t, p, e in zip(texts, probabilities, explanations)]

    return classify


def serve(model, info, checkpoint, device, tokenizer, host, port):
    """Serves the page, /info and /classify until Ctrl-C; the model is loaded once."""
    config = info["config"]  # what /info answers and the page shows above the text box
    description = {"checkpoint": Path(checkpoint).name, "labels": info["labels"],
                   "model": info["model"], "layers": config["n_layers"],
                   "emb_dim": config["emb_dim"], "max_length": info["max_length"],
                   "pool": info["pool"], "trainable": info["trainable"]}
    server = make_server(host, port, classifier(model, info, device, checkpoint, tokenizer),
                         description)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: listening on {host}, not only on this machine: whoever reaches it on "
              f"port {server.server_port} can use the classifier.")
    shown = f"[{host}]" if ":" in host else host
    print(f"Serving {checkpoint} at http://{shown}:{server.server_port}/ "
          f"(Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped.", file=sys.stderr)
    finally:
        server.server_close()


def add_serve_options(parser):
    parser.add_argument("--serve", action="store_true",
                        help="instead of classifying TEXTs, serve a page to try the classifier "
                             "in a browser (with a \"why?\" view per message), and POST "
                             "/classify with {\"texts\": [...]} as Content-Type: "
                             "application/json, and \"explain\": true for each token's share "
                             f"(at most {MAX_EXPLAINED} texts then)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="with --serve: the address to listen on (IPv4 or IPv6: ::1); "
                             "0.0.0.0 or :: opens it to other machines (default: %(default)s, "
                             "this machine only)")
    parser.add_argument("--port", type=port_number, default=8000,
                        help="with --serve: the port; 0 lets the system pick a free one "
                             "(default: %(default)s)")


def check_serve_options(parser, args):
    if args.serve and (args.texts or args.all or args.json or args.explain
                       or args.threshold != "argmax"):
        parser.error("--serve takes no TEXT, --all, --json, --explain or --threshold: the "
                     "page shows every class's probability, and explains on request")
    if not args.serve and (args.host != "127.0.0.1" or args.port != 8000):
        parser.error("--host and --port go with --serve")

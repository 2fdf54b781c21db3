"""classify.py --serve: a page to try the classifier (page.html) and a small
JSON API. One asyncio loop reads every connection (an idle one costs a socket, not a
thread); one thread runs the model on complete requests, classifications first."""
import asyncio
import base64
import concurrent.futures
import contextlib
import errno
import hashlib
import http.client
import io
import ipaddress
import json
import os
import re
import resource
import socket
import sys
import threading
import time
import traceback
import types
from pathlib import Path
from beyond.cli import InputError, parse_json, port_number
from beyond.explain import EXPLAIN_DEFAULT, MAX_EXPLAINED
from beyond.stream import NonFiniteLogits, classify_and_explain, result_record


MAX_BODY = 1_000_000     # bytes of one /classify request
MAX_HEAD = 65_536        # bytes of a request's line and headers
MAX_TEXTS = 1_000        # messages in one /classify request
TIMEOUT = 10.0           # seconds a client may take for a line of its head, or for its body
MAX_CONNECTIONS = 4_096  # connections read at a time (a socket each, no thread); more get 503
BACKLOG = 1_024          # connections the kernel holds until the server accepts them
REQUEST_DEADLINE = 30.0  # seconds a client has to send its whole request
MAX_DRAIN = 16_000_000   # bytes of an unread body read and dropped after an error answer
EXPLAIN_SECONDS = 30.0   # of the model thread for a request with explanations; more: 413
MAX_EXPLAINS_WAITING = 4  # requests with "explain" waiting for the model; more get 503
MAX_WAITING = 256        # requests to classify waiting for the model; more get 503
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
        request = parse_json(body)
    except ValueError as e:  # UnicodeDecodeError too
        raise RequestError(400, f"the body is not JSON this server reads: {e}") from None
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


class Connection:
    """One connection's one request (HTTP/1.0): the page, /info, /classify."""
    routes = {"/": "GET", "/info": "GET", "/classify": "POST"}

    def __init__(self, server, reader, writer):
        self.server, self.reader, self.writer = server, reader, writer
        self.method, self.path, self.headers, self.body_read = "GET", "/", {}, False

    async def handle(self):
        self.server.open += 1
        try:
            async with asyncio.timeout(self.server.deadline) as self.deadline:
                try:  # over the cap: answered 503
                    await self.route(self.server.open > self.server.max_connections)
                except RequestError as e:
                    await self.answer(e.args[0], {"error": e.args[1]})
                    await self.linger()
        except Exception as e:  # a bug: its traceback (a client gone, silent or slow: none)
            if not isinstance(e, (ConnectionError, TimeoutError, EOFError)):
                traceback.print_exc()
        finally:
            self.server.open -= 1
            self.writer.close()

    async def in_time(self, waiting):  # TimeoutError if the client takes too long
        return await asyncio.wait_for(waiting, self.server.client_timeout)

    async def route(self, busy):
        await self.read_head()
        self.check(busy)
        body = await self.read_body() if self.method == "POST" else None
        self.deadline.reschedule(None)  # the request is in: the answer may take its time
        if self.path == "/classify":
            results = await self.server.results(*parse_request(body), self.reader)
            await self.answer(200, {"results": results})
        else:
            await self.answer(200, PAGE if self.path == "/" else self.server.description)

    async def read_head(self):  # self.method, self.path, self.headers
        head = bytearray()
        try:
            while not head.endswith((b"\n\n", b"\n\r\n")):  # EOFError if the client closes
                head += await self.in_time(self.reader.readuntil(b"\n"))
                if len(head) > MAX_HEAD:  # asyncio's limit is for one line
                    raise ValueError()
            request_line, _, headers = bytes(head).partition(b"\n")
            self.headers = http.client.parse_headers(io.BytesIO(headers))  # at most 100
        except (ValueError, asyncio.LimitOverrunError, http.client.HTTPException):
            raise RequestError(431, f"the request line and headers are over {MAX_HEAD:,} "
                                    f"bytes or 100 headers") from None
        words = request_line.decode("latin-1").split()
        if len(words) != 3 or not words[2].startswith("HTTP/1."):
            raise RequestError(400, "the request line is not METHOD /path HTTP/1.x")
        self.method, self.path = words[0], words[1].split("?", 1)[0]  # the page: /?anything

    def check(self, busy):
        """RequestError unless this server takes this request from this client."""
        if busy:
            raise RequestError(503, "the server is answering as many connections as it "
                                    "takes at a time; try again in a moment")
        method = "GET" if self.method == "HEAD" else self.method  # HEAD: GET's headers
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

    async def read_body(self):
        if "Transfer-Encoding" in self.headers:  # chunked: not read here
            raise RequestError(411, "send the body with a Content-Length, not a Transfer-Encoding")
        lengths = {value.strip() for value in self.headers.get_all("Content-Length") or []}
        # plain digits, and not so many that int() refuses them (it does 5,000)
        digits = re.fullmatch(r"0*([0-9]{1,15})", lengths.pop()) if len(lengths) == 1 else None
        if not digits:
            raise RequestError(400, "the request has no valid Content-Length")
        if (length := int(digits[1])) > MAX_BODY:
            raise RequestError(413, f"the body has {length:,} bytes; at most {MAX_BODY:,}")
        self.body_read = True
        return await self.in_time(self.reader.readexactly(length))  # EOFError if cut short

    async def answer(self, status, body):  # body: the page, or what is sent as JSON
        kind = "text/html" if isinstance(body, str) else "application/json"
        data = (body if kind == "text/html" else json.dumps(body, allow_nan=False)).encode()
        headers = {"Content-Type": f"{kind}; charset=utf-8", "Content-Length": len(data),
                   **SECURITY_HEADERS}
        if status == 405:
            headers["Allow"] = self.routes[self.path].replace("GET", "GET, HEAD")
        head = f"HTTP/1.0 {status} {http.HTTPStatus(status).phrase}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
        self.writer.write(head.encode() + (b"" if self.method == "HEAD" else data))
        await self.in_time(self.writer.drain())  # a client that reads nothing is dropped

    async def linger(self):
        """Drops the unread body after an error answer: closing with unread data
        resets the connection, and a client still sending would never see the answer."""
        if self.body_read or (self.headers.get("Content-Length", "0") == "0"
                              and "Transfer-Encoding" not in self.headers):
            return
        self.writer.write_eof()  # the answer is complete
        left = MAX_DRAIN
        while left > 0 and (chunk := await self.in_time(self.reader.read(min(left, 65536)))):
            left -= len(chunk)


class ClassifierServer:
    """An asyncio loop (serve_forever's) for the connections, a thread for the model: the
    classifications waiting go first, and between an explanation's batches of passes."""

    def __init__(self, listener, host_names, classify, description, limits):
        self.listener, self.host_names = listener, host_names
        self.server_address = listener.getsockname()
        self.server_port = self.server_address[1]
        # classify(texts, explain, between) -> results; description: what /info answers
        self.classify, self.description = classify, description
        self.client_timeout, self.deadline, wanted, self.explain_seconds = limits
        # a file descriptor a connection and 64 for the rest: the soft limit raised toward
        # the hard one as needed, the cap lowered to what it allows
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted + 64:
            soft = wanted + 64 if hard == resource.RLIM_INFINITY else min(hard, wanted + 64)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        self.max_connections = wanted if soft == resource.RLIM_INFINITY else min(wanted, soft - 64)
        self.open = 0  # connections, counted on the loop's thread
        self.waiting = {False: [], True: []}  # by explain: appended here, popped there
        self.job_added = threading.Semaphore(0)
        self.stopping = threading.Event()
        self.model_thread = threading.Thread(target=self.work, daemon=True)
        self.model_thread.start()

    def serve_forever(self):
        """Answers connections until server_close() or Ctrl-C (KeyboardInterrupt)."""
        asyncio.run(self.listen())  # Ctrl-C: the connections' tasks cancelled, then raised

    async def listen(self):
        listening = await asyncio.start_server(
            lambda reader, writer: Connection(self, reader, writer).handle(),
            sock=self.listener, limit=MAX_HEAD, backlog=BACKLOG)
        while not self.stopping.is_set():  # server_close() sets it, on another thread
            await asyncio.sleep(0.05)
        listening.close()  # and its socket

    def server_close(self):
        """Stops serving and ends the model thread, after its request or batch: left to
        drop the model as Python exits, it would abort Python."""
        self.stopping.set()
        self.job_added.release()
        self.model_thread.join()

    async def results(self, texts, explain, reader):
        """The model thread's results for texts; its work stops if the client leaves."""
        most = MAX_EXPLAINS_WAITING if explain else MAX_WAITING
        if len(self.waiting[explain]) >= most:
            kind = 'with "explain"' if explain else "to classify"
            raise RequestError(503, f"{most} requests {kind} are waiting already; try again "
                                    f"in a moment")
        job = types.SimpleNamespace(texts=texts, explain=explain, gone=False,
                                    future=concurrent.futures.Future())
        self.waiting[explain].append(job)
        self.job_added.release()

        # a client that leaves (closes its connection) stops its work, before or between batches
        async def until_closed():
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
            job.gone = True
        watching = asyncio.ensure_future(until_closed())
        try:
            return await asyncio.wrap_future(job.future)
        finally:
            watching.cancel()

    def work(self):
        while self.job_added.acquire() and not self.stopping.is_set():
            if self.waiting[False] or self.waiting[True]:  # empty: taken by between()
                self.run((self.waiting[False] or self.waiting[True]).pop(0))

    def run(self, job):
        if not job.future.set_running_or_notify_cancel():
            return  # the server stops
        if job.gone:  # its client has left: no work for nobody
            return job.future.set_exception(ConnectionAbortedError("the client has left"))
        job.started = time.monotonic()
        try:
            job.future.set_result(self.classify(job.texts, job.explain,
                                                lambda: self.between(job)))
        except Exception as e:  # a RequestError, a stop or a bug: the connection's to handle
            job.future.set_exception(e)

    def between(self, job):
        """Runs between batches of job's explanation: the classifications waiting, then
        job stops if its client has left or it has had its share of the model thread."""
        paused = time.monotonic()
        while self.waiting[False]:
            self.run(self.waiting[False].pop(0))
        job.started += time.monotonic() - paused  # the others' work is not job's share
        if job.gone or self.stopping.is_set():
            raise ConnectionAbortedError("the client has left, or the server stops")
        if time.monotonic() - job.started > self.explain_seconds:
            raise RequestError(413, f"explaining these texts takes more than the "
                                    f"{self.explain_seconds:g} s of the model thread a request "
                                    f"may have; explain fewer or shorter texts")


def make_server(host, port, classify, description, timeout=TIMEOUT, deadline=REQUEST_DEADLINE,
                max_connections=MAX_CONNECTIONS, explain_seconds=EXPLAIN_SECONDS):
    """The server of --serve on host and port (IPv4 or IPv6, as the host's address is)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
    except socket.gaierror as e:
        raise InputError(f"cannot listen on {host}: {e.strerror}. --host takes an address "
                         f"or name of this machine: 127.0.0.1, ::1, 0.0.0.0 or ::.") from None
    try:  # a burst waits in the backlog until the loop runs; "::" takes IPv4 too
        listener = socket.create_server((host, port), family=family, backlog=BACKLOG,
                                        dualstack_ipv6=host == "::")
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else e  # without create_server's address
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            raise InputError(f"cannot listen on {host} port {port}: {reason}. Choose another "
                             f"with --port (0 lets the system pick a free one).") from None
        raise InputError(f"cannot listen on {host}: {reason}. --host takes an "
                         f"address of this machine: 127.0.0.1, ::1, 0.0.0.0 or ::.") from None
    # the names, besides IP addresses, that a Host header may give this server
    names = {"localhost", host, socket.getfqdn(host)}
    if host in ("0.0.0.0", "::"):  # every interface: the machine's own name too
        names.add(socket.gethostname())
    return ClassifierServer(listener, {name.lower().rstrip(".") for name in names}, classify,
                            description, (timeout, deadline, max_connections, explain_seconds))


def classifier(model, info, device, checkpoint, tokenizer):
    """classify(texts, explain, between) -> result records, on the server's model thread;
    between() runs between an explanation's batches of passes."""
    def classify(texts, explain, between):
        try:
            answers = classify_and_explain(texts, model, tokenizer, device, info,
                                           method=explain and EXPLAIN_DEFAULT, between=between)
        except NonFiniteLogits as e:  # the name only: a client is not told paths
            raise RequestError(500, f"{Path(checkpoint).name}: {e}") from None
        return [result_record(text, probas, info["labels"], explanation=explanation)
                for text, (probas, explanation) in zip(texts, answers)]

    return classify


def serve(model, info, args, device, tokenizer):
    """Serves the page, /info and /classify until Ctrl-C; the model is loaded once."""
    checkpoint, host, port = args.checkpoint, args.host, args.port
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
                             f"(at most {MAX_EXPLAINED} texts and {EXPLAIN_SECONDS:g} s of the "
                             f"model's time then)")
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

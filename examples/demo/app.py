"""The demo's sample application: a tiny HTTP server that answers every GET
with its pod name, its node and the address the request came from.

It knows nothing about the mesh; run inside a pod's network namespace:
    python3 app.py POD NODE PORT
"""

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hello(BaseHTTPRequestHandler):
    pod = "?"
    node = "?"

    def do_GET(self):  # noqa: N802 (the name http.server calls)
        body = f"hello from {self.pod} on {self.node}, you are {self.client_address[0]}\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # noqa: A002
        # One line per request on stderr, which the demo keeps in a log file.
        sys.stderr.write(f"{self.pod}: {self.client_address[0]} {format % args}\n")


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: app.py POD NODE PORT")
    Hello.pod, Hello.node = sys.argv[1], sys.argv[2]
    server = ThreadingHTTPServer(("0.0.0.0", int(sys.argv[3])), Hello)
    print(f"{Hello.pod} listening on :{sys.argv[3]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()

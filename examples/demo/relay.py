"""Carries TCP connections from a pod's network namespace to this machine's
127.0.0.1, for the demo's waypoint.

The control plane listens on 127.0.0.1 in the machine's own namespace,
which a pod's namespace cannot reach (the demo adds no link or route to
the machine's namespace). The node dataplanes do not need this: they run
in the machine's namespace. The waypoint runs inside its pod, as in a
cluster, and reaches the control plane's xDS and CA port through this
relay: it listens on 127.0.0.1:PORT inside the pod and connects each
connection to 127.0.0.1:PORT outside. Bytes are copied untouched (the TLS
is end to end), so the waypoint checks the control plane's certificate for
127.0.0.1 as the dataplanes do.

    python3 relay.py /var/run/netns/NAME PORT      (as root)
"""

import ctypes
import os
import socket
import sys
import threading

CLONE_NEWNET = 0x40000000


def setns(fd):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def pump(src, dst):
    """Copies src to dst until src ends, then half-closes dst."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


def serve(client, port):
    try:
        upstream = socket.create_connection(("127.0.0.1", port), timeout=5)
        upstream.settimeout(None)
    except OSError as e:
        sys.stderr.write(f"relay: 127.0.0.1:{port} outside the pod: {e}\n")
        client.close()
        return
    back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
    back.start()
    pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: relay.py NETNS_PATH PORT")
    netns, port = sys.argv[1], int(sys.argv[2])
    # A socket stays in the namespace it was made in: make the listener
    # inside the pod, then come back, so every upstream connection is made
    # outside it. Only this (the only) thread switches.
    with open("/proc/self/ns/net") as home, open(netns) as pod:
        setns(pod.fileno())
        listener = socket.create_server(("127.0.0.1", port))
        setns(home.fileno())
    print(f"relaying 127.0.0.1:{port} in {netns} to 127.0.0.1:{port} here", flush=True)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=serve, args=(client, port), daemon=True).start()


if __name__ == "__main__":
    main()

"""TCP helpers for the pod namespaces of cli/tests/netns/control_k3s.sh.

serve NAME PORT...          answer every connection on each PORT with
                            "NAME:PORT" and close (a pod's service)
get HOST PORT SECONDS       print the banner HOST:PORT answers within
                            SECONDS; exit 0 if one came, 1 if not
refused HOST PORT SECONDS   connect once (at most SECONDS): print the
                            outcome ("refused", "connected", "timeout" or
                            the error's name) and the seconds it took;
                            exit 0 if the connect was refused
udp HOST PORT SECONDS       send one datagram on a connected UDP socket
                            and wait up to SECONDS for an answer: print
                            the outcome ("reply", "timeout" or the errno's
                            name, e.g. EHOSTUNREACH for an ICMP
                            admin-prohibited) and the seconds it took;
                            exit 0 on EHOSTUNREACH
flip HOST PORT open|closed SECONDS
                            connect every 20 ms (each attempt at most
                            150 ms) until the port is in the given state:
                            print the wall-clock time the first attempt
                            that saw it started, exit 0; exit 1 if it
                            never did within SECONDS, 3 if the first
                            attempt already saw it; prints "probing"
                            after that first attempt
"""

import errno
import selectors
import socket
import sys
import time


def banner(host, port, timeout):
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(256).decode(errors="replace").strip()
    except OSError:
        return ""


def refused(host, port, timeout):
    start = time.monotonic()
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            outcome = "connected"
    except ConnectionRefusedError:
        outcome = "refused"
    except socket.timeout:
        outcome = "timeout"
    except OSError as e:
        outcome = type(e).__name__
    print(f"{outcome} {time.monotonic() - start:.4f}")
    return 0 if outcome == "refused" else 1


def udp(host, port, timeout):
    start = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, int(port)))
            s.send(b"ping")
            s.recv(256)
            outcome = "reply"
        except socket.timeout:
            outcome = "timeout"
        except OSError as e:
            outcome = errno.errorcode.get(e.errno, type(e).__name__)
    print(f"{outcome} {time.monotonic() - start:.4f}")
    return 0 if outcome == "EHOSTUNREACH" else 1


def serve(name, ports):
    sel = selectors.DefaultSelector()
    for port in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", int(port)))
        s.listen(64)
        sel.register(s, selectors.EVENT_READ, port)
    while True:
        for key, _ in sel.select():
            try:
                c, _ = key.fileobj.accept()
            except OSError:
                continue
            try:
                c.sendall(f"{name}:{key.data}\n".encode())
            except OSError:
                pass
            c.close()


def main(argv):
    if argv[0] == "serve":
        serve(argv[1], argv[2:])
    elif argv[0] == "get":
        got = banner(argv[1], argv[2], float(argv[3]))
        print(got)
        return 0 if got else 1
    elif argv[0] == "refused":
        return refused(argv[1], argv[2], float(argv[3]))
    elif argv[0] == "udp":
        return udp(argv[1], argv[2], float(argv[3]))
    elif argv[0] == "flip":
        host, port, want, seconds = argv[1], argv[2], argv[3], float(argv[4])
        end = time.monotonic() + seconds
        first = True
        while time.monotonic() < end:
            started = time.time()
            is_open = bool(banner(host, port, 0.15))
            if is_open == (want == "open"):
                if first:
                    print(f"already {want}", file=sys.stderr)
                    return 3
                print(f"{started:.3f}")
                return 0
            if first:
                print("probing", flush=True)
            first = False
            time.sleep(0.02)
        return 1
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

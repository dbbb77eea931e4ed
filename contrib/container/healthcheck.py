"""Container health check: asks vhostd over its QMP control socket whether it runs.

Exit 0 when ``query-status`` says running, 1 otherwise (no answer, an error, not
running). The socket path is the first argument (default /run/vhostd/control.sock).
Standard library only, so it runs with the image's system Python.
"""

import json
import socket
import sys


def main() -> int:
    path = sys.argv[1] if len(sys.argv) > 1 else "/run/vhostd/control.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(4)
            s.connect(path)
            f = s.makefile("rw")

            def reply() -> dict:
                # Events may come before a command's reply: skip them.
                while True:
                    line = f.readline()
                    if not line:
                        raise ConnectionError("connection closed")
                    msg = json.loads(line)
                    if "return" in msg or "error" in msg:
                        return msg

            json.loads(f.readline())  # the greeting
            f.write('{"execute": "qmp_capabilities"}\n')
            f.flush()
            reply()
            f.write('{"execute": "query-status"}\n')
            f.flush()
            status = reply().get("return") or {}
    except (OSError, ValueError) as e:
        print(f"vhostd health: {e}", file=sys.stderr)
        return 1
    return 0 if status.get("running") else 1


if __name__ == "__main__":
    sys.exit(main())

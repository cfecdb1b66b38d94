"""The application the lifecycle demo runs: a tiny web server on the engine's own address.

Standard library only: like anything that starts inside a CML engine, it must run before
anything is installed.
"""

import http.server
import json
import os


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(
            {
                "hello_from": os.environ.get("CDSW_IP_ADDRESS"),
                "engine_id": os.environ.get("CDSW_ENGINE_ID"),
                "pid": os.getpid(),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    address = (os.environ["CDSW_IP_ADDRESS"], int(os.environ["CDSW_APP_PORT"]))
    print(f"serving on http://{address[0]}:{address[1]}", flush=True)
    http.server.HTTPServer(address, Hello).serve_forever()

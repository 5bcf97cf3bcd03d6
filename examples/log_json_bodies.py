"""Log the JSON bodies sent to and returned by one API (EYEWALL_API_HOST), up to 1 MiB
each; larger bodies stream through untouched and are noted as such.

    EYEWALL_API_HOST=api.example.com eyewall --addon examples/log_json_bodies.py
"""

import json
import os

API_HOST = os.environ.get("EYEWALL_API_HOST", "api.example.com")
LIMIT = 1 << 20


def _is_json(headers):
    return "json" in (headers.get("content-type") or "").lower()


class LogJsonBodies:
    def load(self, loader):
        self.log = loader.log

    def requestheaders(self, flow):
        if flow.request.host == API_HOST and _is_json(flow.request.headers):
            flow.request.buffer(LIMIT)

    def request(self, flow):
        self._log(flow, "request", flow.request)

    def responseheaders(self, flow):
        if flow.request.host == API_HOST and _is_json(flow.response.headers):
            flow.response.buffer(LIMIT)

    def response(self, flow):
        self._log(flow, "response", flow.response)

    def _log(self, flow, side, message):
        if message.truncated:
            self.log.info("%s %s %s: body over %d bytes, not logged", flow.id, side,
                          flow.request.url, LIMIT)
        elif message.body is not None:
            try:
                document = json.loads(message.body)
            except ValueError:
                self.log.info("%s %s %s: not valid JSON", flow.id, side, flow.request.url)
                return
            self.log.info("%s %s %s: %s", flow.id, side, flow.request.url,
                          json.dumps(document, sort_keys=True))

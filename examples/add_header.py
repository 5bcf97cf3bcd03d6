"""Add a header to every request Eyewall forwards and to every response it returns.

    eyewall --addon examples/add_header.py
"""


class AddHeader:
    def requestheaders(self, flow):
        flow.request.headers.set("X-Forwarded-By", "eyewall")

    def responseheaders(self, flow):
        flow.response.headers.set("X-Inspected-By", "eyewall")

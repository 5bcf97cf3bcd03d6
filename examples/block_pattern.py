"""Answer requests whose URL matches a pattern with a page of our own; the origin never
sees them.  The pattern comes from EYEWALL_BLOCK_PATTERN (a regular expression).

    EYEWALL_BLOCK_PATTERN='/(ads|track)/' eyewall --addon examples/block_pattern.py
"""

import html
import os
import re

PATTERN = re.compile(os.environ.get("EYEWALL_BLOCK_PATTERN", r"/(ads|tracking)/"))
PAGE = """<!doctype html>
<meta charset="utf-8">
<title>Blocked</title>
<h1>This address is blocked</h1>
<p>{url}</p>
<p>Ask your proxy administrator if you need it.</p>
"""


class BlockPattern:
    def requestheaders(self, flow):
        if PATTERN.search(flow.request.url):
            flow.metadata["blocked"] = PATTERN.pattern
            flow.respond(
                403,
                {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-store"},
                PAGE.format(url=html.escape(flow.request.url)),
            )

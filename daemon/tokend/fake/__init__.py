"""A fake Justimmo authorization server (league/oauth2-server 5.x to 9.x) on a real local port.

Tests, the demo and the benchmarks need a provider that behaves like the real one where
it matters to tokend: refresh-token rotation without grace period, the error bodies and
HTTP statuses of each league major version, ``client_secret_post`` and
``client_secret_basic``, and the failures seen in production (HTML 5xx pages, 429,
timeouts and dropped connections, including the ambiguous "rotated, then the answer was
lost"). It speaks real HTTP/1.1 with keep-alive so connection pooling and concurrency are
exercised as well.

All expiry decisions use the injected ``clock`` (so tests can jump a month ahead); latency
and hangs use real time. Control and inspection work in-process (methods) and over HTTP
(``/_fake/*``), so the fake can also run as a separate process:
``python -m tokend.fake --port 8080 --latency 0.05``.

Modules: ``league`` (messages, token records, response shapes), ``answers`` (league's
error and success bodies per version), ``faults`` (injected failures), ``provider`` (token
state and endpoints), ``server`` (HTTP), ``control`` (``/_fake/*``), ``__main__`` (the
process).
"""

from tokend.fake.faults import FAULTS
from tokend.fake.league import ONE_MONTH, IssuedTokens, League, json_response
from tokend.fake.provider import FakeJustimmo

__all__ = ["FAULTS", "ONE_MONTH", "FakeJustimmo", "IssuedTokens", "League", "json_response"]

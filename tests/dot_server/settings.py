"""Django settings of the DOT test server, configured like league/oauth2-server.

Everything that varies comes from the environment set by ``serve.py``: the SQLite file
(``DOT_DB``), the access-token lifetime (``DOT_ACCESS_TTL``, seconds) and whether the
authorization endpoint insists on PKCE (``DOT_PKCE_REQUIRED``, DOT's default: yes).
"""

from __future__ import annotations

import os

SECRET_KEY = "tokend-black-box-tests-only"  # a loopback test server, never deployed
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "dot_server.urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "oauth2_provider",
]
# Sessions and auth only for the consent flow: /o/authorize/ needs a logged-in user,
# whom /_test/login provides without a form (the test plays the user's browser).
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
]
LOGIN_URL = "/_test/login"

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DOT_DB", "dot.sqlite3"),
        "OPTIONS": {"timeout": 30},
    }
}

# DOT hashes client secrets with the first hasher: the default PBKDF2 (a million rounds)
# would cost ~0.5 s of a shared CPU on every token request. Test speed only; what DOT
# does with the secret is unchanged (it is hashed at rest and checked per request).
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

OAUTH2_PROVIDER = {
    # league/oauth2-server: a refresh rotates both tokens, the old refresh token dies at
    # once, and presenting it again is refused. DOT's reuse protection goes further: a
    # reused refresh token also revokes every token of its family (the whole grant).
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    "ACCESS_TOKEN_EXPIRE_SECONDS": int(os.environ.get("DOT_ACCESS_TTL", "3600")),
    "SCOPES": {"read": "Reading scope", "write": "Writing scope"},
    "ALLOWED_REDIRECT_URI_SCHEMES": ["http", "https"],
    "PKCE_REQUIRED": os.environ.get("DOT_PKCE_REQUIRED", "1") == "1",
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
}

"""A minimal django-oauth-toolkit server, run as a process of its own by the black-box tests.

See ``serve.py`` (the process) and ``tests/dotlib.py`` (driving it from a test).
"""

"""tokend keeps OAuth 2.0 grants alive."""

__version__ = "0.1.0"

"""Eyewall: an asynchronous HTTP/HTTPS forward proxy on Tornado."""

__version__ = "0.1.0"

"""Access control, pure: who may use the proxy, where they may go, how often.

Nothing here performs I/O or imports Tornado; the proxy asks, these modules answer with
a value (`Decision`, an authenticated user or None, a limit that fired or None).
"""

"""State shared by the Eyewall nodes of a fleet: rate limits, concurrency leases and
failed-login counts kept in Redis (`eyewall.shared.redis_limits`).

Each module here does its own I/O and raises one documented exception when the shared
store cannot answer in time, so that the caller applies its fail-open or fail-closed
setting; none of them decides what a request may do.
"""

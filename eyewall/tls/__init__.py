"""TLS interception: Eyewall's own certificate authority and the per-host certificates
it mints for intercepted CONNECTs."""

"""Python addons: classes whose methods are named after proxy events (see
docs/hooks.md, generated from `eyewall.addons.hooks`)."""

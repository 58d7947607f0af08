"""The OpenAI-compatible HTTP server: protocol, QoS fields, engine thread, metrics, app."""

"""The OpenAI-compatible HTTP server: protocol, QoS fields, the engine process and its client, metrics, app, Ray Serve replicas."""

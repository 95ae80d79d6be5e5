"""The HTTP edge for e-service submissions and the client SDK."""

"""The HTTP layer: decode, call the service, encode. Imports no MLX; nothing below imports it."""

"""The gateway: one authenticated gRPC + HTTP/JSON entry in front of the audience and retarget services.

See ``services/gateway/README.md``; entry points are
``services.gateway.server.create_gateway_server`` and ``python -m services.gateway``.
"""

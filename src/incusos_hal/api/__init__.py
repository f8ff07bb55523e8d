"""The API service: IncusOS's REST API over a unix socket (peer credentials) and HTTPS
(client certificates), on top of the config store and the HAL.

    envelope    Incus's response envelope and ETags (pure)
    auth        SO_PEERCRED, the TLS 1.3 context and the client-certificate trust store
    service     validate -> store -> apply, network confirmation, backup and restore
    state       the `state` halves read from the machine
    operations  background operations and the event stream
    backup      archive creation and checking
    openapi     the OpenAPI description, from the route table and the config model
    server      the aiohttp application and its listeners
    client      the CLI's client (stdlib only)
"""

"""``kvplane router``: an OpenAI front door that sends each request to the instance where
its expected cost (prompt tokens to compute after the instance's own hit and a P2P fetch,
plus its load) is least. No torch: a router host needs no engine.

Modules: ``scoring`` (the pure cost and choice), ``pool`` (backends, health, load; pure),
``settings`` (the key table), ``tokens`` (prompt ids via the backends' /tokenize),
``upstream`` (controller and backend checks), ``heartbeat`` (the report to the controller),
``service`` (one decision), ``proxy``
(forwarding and streaming), ``metrics``, ``app`` (HTTP), ``cli``.
"""

"""``kvplane demo``: a controller and two reference servers on loopback, every seed flow."""

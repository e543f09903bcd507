"""The router's settings: a key table like the controller's (:mod:`kvplane.settings_table`),
set from a YAML ``--config`` file, then from the command line.

The score's weights are in prompt tokens computed (:mod:`kvplane.router.scoring`). Their
defaults: a CPU-tier hit loads about 20x faster than the prefill it saves (vLLM on this
machine's CPU: ~0.3 ms a token to load, ~6 ms a token to compute), disk about 5x, a P2P
fetch about 7x; a request ahead costs about a 256-token prefill of waiting (the mean
prompt a multi-round chat adds per turn). ``make bench-route`` measures them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvplane.errors import ConfigError
from kvplane.router.pool import parse_backend
from kvplane.router.scoring import Weights
from kvplane.settings_table import (
    BOOL,
    FLOAT,
    INT,
    LOG_LEVEL,
    LOG_LEVELS,
    OPT_STR,
    STR,
    STR_LIST,
    KeySpec,
    Kind,
    check_known,
    key,
    key_table,
    read_yaml,
    validate_fields,
)

__all__ = ["RouterConfig", "router_keys", "weights_of"]


def _url_list(v: Any) -> tuple[str, ...]:
    """A URL, a list of URLs or a comma-separated string; each http(s)://host[:port]."""
    urls = () if v is None else STR_LIST.parse(v)
    for url in urls:
        if not re.match(r"^https?://[^/\s]+/?$", url):
            raise ValueError(f"expected http://host:port URLs, got {url!r}")
    return tuple(u.rstrip("/") for u in urls)


URL_LIST = Kind("str | list[str] | null", _url_list)


@dataclass(frozen=True, repr=False)
class RouterConfig:
    """The router process's settings; its fields are the key table. Frozen and valid
    however it is built."""

    host: str = key("0.0.0.0", "Address to bind.", kind=STR, flags=("--host",))
    port: int = key(8080, "HTTP port.", kind=INT, minimum=1, maximum=65535, flags=("--port",))
    controller: tuple[str, ...] = key(
        (),
        "The controller's HTTP URL (http://host:9000): /lookup for each request, /status "
        "for the instances and their serving_url. Several (a list, or comma-separated): "
        "replicas of one index (kvplane controller --nats); each call goes to the one that "
        "answered last, and to the next at once when it fails. --controller adds one.",
        kind=URL_LIST,
    )
    controller_token: str | None = key(
        None,
        "The controller's api_token, sent as Authorization: Bearer <token> on /lookup, "
        "/status and the heartbeat (needed by a controller with api_token; for /lookup and "
        "/status only with protect_reads). null: none sent.",
        kind=OPT_STR,
        secret=True,
        flags=("--controller-token",),
    )
    router_id: str | None = key(
        None,
        "This router's name on the controller's GET /routers and dashboard. null: "
        "host:port (a wildcard host replaced by the machine's name).",
        kind=OPT_STR,
        flags=("--router-id",),
    )
    backends: tuple[str, ...] = key(
        (),
        "Backends besides those the controller lists: [INSTANCE_ID=]URL each (a bare URL "
        "is matched to the instance whose serving_url it is). --backend adds one.",
        kind=STR_LIST,
    )
    discover: bool = key(
        True, "Route to every instance the controller lists with a serving_url.", kind=BOOL
    )
    # --- the score (prompt tokens computed; see kvplane/router/scoring.py)
    cpu_hit_cost: float = key(
        0.05, "Cost of a token loaded from the CPU tier.", kind=FLOAT, minimum=0.0
    )
    disk_hit_cost: float = key(
        0.2, "Cost of a token loaded from the disk tier.", kind=FLOAT, minimum=0.0
    )
    other_tier_cost: float = key(
        0.3, "Cost of a token loaded from any other tier (remote, FS).", kind=FLOAT, minimum=0.0
    )
    p2p_cost: float = key(
        0.15, "Cost of a token fetched from another instance by P2P.", kind=FLOAT, minimum=0.0
    )
    p2p: bool = key(
        True, "The instances fetch from each other (enable_p2p): count P2P fetches.", kind=BOOL
    )
    request_cost: float = key(
        256.0,
        "Cost of each request ahead on a backend (its running + waiting, or the router's "
        "in flight to it, whichever is larger).",
        kind=FLOAT,
        minimum=0.0,
    )
    kv_usage_cost: float = key(
        512.0,
        "Cost of a full KV cache; from kv_usage_threshold up it rises linearly to this.",
        kind=FLOAT,
        minimum=0.0,
    )
    kv_usage_threshold: float = key(
        0.8,
        "Share of a backend's KV cache in use (its kv_cache_usage_perc) below which it "
        "costs nothing.",
        kind=FLOAT,
        minimum=0.0,
        maximum=0.99,
    )
    affinity_header: str | None = key(
        "x-session-id",
        "Request header naming a session (null: none); its requests prefer the backend it "
        "went to last, among the cheapest.",
        kind=OPT_STR,
    )
    affinity_user: bool = key(
        True, "The body's `user` field names a session too (when no header does).", kind=BOOL
    )
    affinity_tolerance: float = key(
        32.0,
        "How much dearer (tokens) the session's backend may be and still win.",
        kind=FLOAT,
        minimum=0.0,
    )
    recent_s: float = key(
        30.0,
        "Seconds a prompt the router sent to a backend counts as held there (as a hit in "
        "its own cache) while the index shows that backend none of it: the index shows a "
        "prefix only once its prefill is done and stored. 0: the index alone.",
        kind=FLOAT,
        minimum=0.0,
        flags=("--recent-s",),
    )
    recent_block: int = key(
        64, "Block size (tokens) of the prompts the router remembers sending.", kind=INT,
        minimum=1,
    )  # fmt: skip
    # --- health and timing
    poll_interval_s: float = key(
        0.5, "Seconds between each backend's /health and /metrics checks.", kind=FLOAT,
        minimum=0.01,
    )  # fmt: skip
    eject_after: int = key(
        3,
        "Failed checks (or refused connections) in a row that eject a backend; one answered "
        "check readmits it.",
        kind=INT,
        minimum=1,
    )
    discovery_interval_s: float = key(
        2.0,
        "Seconds between reads of the controller's instances, and between heartbeats to it "
        "(it forgets a router after 3 missed).",
        kind=FLOAT,
        minimum=0.05,
        maximum=3600.0,
    )
    lookup_timeout_s: float = key(
        0.5,
        "Deadline of /lookup and /tokenize for a routing decision; past it the request is "
        "routed by load (reason fallback).",
        kind=FLOAT,
        minimum=0.001,
    )
    connect_timeout_s: float = key(
        2.0, "Deadline of connecting to a backend.", kind=FLOAT, minimum=0.01
    )
    request_timeout_s: float = key(
        600.0, "Longest wait for a backend's next bytes.", kind=FLOAT, minimum=0.1
    )
    tokenizer: str | None = key(
        None,
        "The backends' tokenizer.json (or a model folder holding one): completions prompts "
        "are tokenized in the router, not by a round trip to a backend's /tokenize (chats "
        "still are). The first prompt is checked against a backend's /tokenize; on any "
        "difference it is dropped with a warning.",
        kind=OPT_STR,
        flags=("--tokenizer",),
    )
    tokenize_cache_size: int = key(
        4096, "Prompts whose token ids are kept, per model.", kind=INT, minimum=0
    )
    log_level: str = key(
        "INFO", "Log level.", kind=LOG_LEVEL, choices=LOG_LEVELS, flags=("--log-level",)
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        for backend in self.backends:
            parse_backend(backend)  # a bad URL stops start-up, before anything is announced
        token = self.controller_token
        if token is not None and not re.fullmatch(r"[\x21-\x7e]+", token):
            raise ConfigError(
                "controller_token: must be printable ASCII without spaces (it goes in a header)"
            )

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{s.name}={'***' if s.secret and getattr(self, s.name) else repr(getattr(self, s.name))}"
            for s in router_keys()
        )
        return f"RouterConfig({fields})"

    def to_dict(self) -> dict[str, Any]:
        return {s.name: getattr(self, s.name) for s in router_keys()}

    @classmethod
    def from_file(cls, path: str | Path) -> RouterConfig:
        """Settings from YAML, keys as in the table. Raises ConfigError naming the key."""
        raw = read_yaml(path, "router config")
        known = ", ".join(s.name for s in router_keys())
        check_known(raw, router_keys(), what="router config", hint=f"known: {known}")
        try:
            return cls(**raw)
        except ConfigError as exc:
            raise ConfigError(f"router config {path}: {exc}") from None


def router_keys() -> tuple[KeySpec, ...]:
    """The router's table, in declaration order."""
    return key_table(RouterConfig)


def weights_of(config: RouterConfig) -> Weights:
    """The score's weights the config sets."""
    return Weights(
        tier_costs={
            "LocalCPUBackend": config.cpu_hit_cost,
            "LocalDiskBackend": config.disk_hit_cost,
        },
        other_tier_cost=config.other_tier_cost,
        p2p_cost=config.p2p_cost,
        request_cost=config.request_cost,
        kv_usage_cost=config.kv_usage_cost,
        kv_usage_threshold=config.kv_usage_threshold,
        affinity_tolerance=config.affinity_tolerance,
        p2p_enabled=config.p2p,
    )

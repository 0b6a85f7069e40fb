"""Options of ``balcony serve`` and the frozen config they map onto."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from server.sampling_defaults import FIELDS as SAMPLING_FIELDS
from server.sampling_defaults import FLAG as SAMPLING_FLAG
from server.sampling_defaults import SamplingDefaults
from server.sampling_defaults import sampling_defaults_option

LOG_LEVELS = ("debug", "info", "warning", "error")
# "auto": the format the chat template teaches (server/tool_parsers.py), "none": tool_choice auto off.
TOOL_CALL_PARSERS = ("auto", "hermes", "llama3_json", "none")
EVENT_LOOPS = ("asyncio", "uvloop")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # bind address; containers use 0.0.0.0
    port: int = 8000
    api_key: str | None = None  # Bearer token required on /v1 when set
    max_num_seqs: int = 64  # requests decoding at once
    max_queued_requests: int = 256  # waiting requests beyond which new ones get 429
    shutdown_timeout: float = 30.0  # seconds to finish in-flight requests after SIGTERM
    budget_policy: str = "best-effort"  # when no exit meets a budget: best-effort or reject
    exits: str = "all"  # exits served, e.g. "22,full" ("all": every exit the adapters have, and full)
    starvation_ratio: float = 2.0  # requests left out of depth-limited steps wait at most this many full steps
    served_model_name: str | None = None  # model name in the API (default: the model source)
    prefix_caching: bool = True  # prompts' computed blocks serve later requests with the same prefix
    overlap_steps: bool = True  # on CUDA, launch each step before reading the previous one's tokens
    tool_call_parser: str = "auto"  # tool_choice "auto"'s call format: from the chat template, named, or none
    recalibrate: bool = False  # measure step costs at start even when a cached calibration fits
    log_level: str = "info"  # debug adds one line per HTTP request
    # asyncio's loop, not uvloop: its socket writes release the interpreter lock, so the step loop
    # runs while the kernel sends each streamed token; uvloop's hold it (docs/benchmarks.md).
    event_loop: str = "asyncio"
    # The step loop in a process of its own (server/engine_process.py), beside the HTTP process,
    # so their Python runs at once instead of taking turns on one interpreter lock. None: on where
    # the model runs on a GPU, whose node has the cores for both (measured there over HTTP:
    # docs/gpu_h200.md, section 6), off on a CPU, where the model's threads would share the
    # machine's few cores with a second process (docs/benchmarks.md, "The step loop in its own
    # process").
    engine_process: bool | None = None
    # (field, value) pairs that requests leaving the field out get instead of the API's default
    # (--override-generation-config; server/sampling_defaults.py): the decoding fields only.
    sampling_defaults: SamplingDefaults = ()

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.max_num_seqs < 1 or self.max_queued_requests < 0 or self.shutdown_timeout < 0:
            raise ValueError("max_num_seqs must be positive, max_queued_requests and shutdown_timeout >= 0")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.budget_policy not in ("best-effort", "reject"):
            raise ValueError(f"budget_policy must be best-effort or reject, got {self.budget_policy!r}")
        parse_exit_list(self.exits, full_depth=10**6)  # syntax only; the model checks the values
        if not self.starvation_ratio >= 0:
            raise ValueError(f"starvation_ratio must be >= 0, got {self.starvation_ratio}")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                             f"got {self.tool_call_parser!r}")


def parse_exit_list(text: str, full_depth: int) -> tuple[int, ...] | None:
    """'22,full' -> (22, full_depth); 'all' -> None (every exit)."""
    if text.strip().lower() in ("all", ""):
        return None
    exits = []
    for item in text.split(","):
        item = item.strip().lower()
        if item == "full":
            exits.append(full_depth)
        elif item.isdigit() and int(item) > 0:
            exits.append(int(item))
        else:
            raise ValueError(f"--exits takes layer counts and 'full' separated by commas, or 'all'; got {item!r}")
    return tuple(exits)


ENGINE_PROCESS_MODES = {"on": True, "off": False, "auto": None}
SWITCH_ON = ("1", "true", "yes", "on")  # what a switch's environment variable reads as set
SWITCH_OFF = ("0", "false", "no", "off")


def engine_process_mode(value: str) -> str:
    """--engine-process's value (or BALCONY_ENGINE_PROCESS's): on, off or auto, or any word a
    switch's variable reads as set or unset."""
    value = value.strip().lower()
    value = "on" if value in SWITCH_ON else "off" if value in SWITCH_OFF else value
    if value not in ENGINE_PROCESS_MODES:
        raise argparse.ArgumentTypeError(f"expected on, off or auto, got {value!r}")
    return value


def add_serve_options(p: argparse.ArgumentParser) -> None:
    """The options of ServeConfig, one flag per field (the CLI adds "(default: ...)" to each help)."""
    d = ServeConfig()
    p.add_argument("--host", default=d.host, help="bind address; 0.0.0.0 listens on every interface")
    p.add_argument("--port", type=int, default=d.port, help="port")
    p.add_argument("--api-key", default=d.api_key,
                   help="require this Bearer token on /v1 endpoints (default: none, no key needed)")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="requests running at once")
    p.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests,
                   help="queued requests beyond which new ones are answered 429")
    p.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="seconds to finish in-flight requests after SIGTERM (a second SIGTERM exits at once)")
    p.add_argument("--budget-policy", default=d.budget_policy, choices=["best-effort", "reject"],
                   help="when no exit can meet a request's latency budget: serve the shallowest exit and "
                        "count a miss, or answer 429")
    p.add_argument("--exits", default=d.exits,
                   help="exits requests may use, routed by budget or forced, e.g. '22,full'; 'all': every "
                        "exit the adapters have, and full")
    p.add_argument("--starvation-ratio", type=float, default=d.starvation_ratio,
                   help="how long a request may be left out of the depth-limited steps that serve tight "
                        "budgets, in full steps: its decode slows by at most about 1 + this")
    p.add_argument("--served-model-name", default=d.served_model_name,
                   help="model name in the API (default: the --model value)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=d.prefix_caching,
                   help="compute every prompt in full instead of reading the blocks an earlier request with the "
                        "same leading tokens (a shared system prompt, another choice of the same prompt) computed")
    p.add_argument("--no-overlap-steps", dest="overlap_steps", action="store_false", default=d.overlap_steps,
                   help="on CUDA, read each step's tokens before scheduling the next instead of scheduling and "
                        "launching step N+1 while the device computes step N (CPU steps never overlap)")
    p.add_argument("--tool-call-parser", default=d.tool_call_parser, choices=TOOL_CALL_PARSERS,
                   help="how tool_choice 'auto' reads calls out of replies: 'auto' picks the format the "
                        "chat template declares (hermes or llama3_json), a name forces one, 'none' answers "
                        "auto with a 400")
    p.add_argument("--recalibrate", action="store_true", default=d.recalibrate,
                   help="measure step costs at start even when a calibration cached for this model, dtype, "
                        "thread count and machine exists (under $BALCONY_HOME/calibration), and replace it")
    p.add_argument("--event-loop", default=d.event_loop, choices=list(EVENT_LOOPS),
                   help="the HTTP side's event loop: asyncio's (its socket writes let the step loop run "
                        "meanwhile) or uvloop")
    p.add_argument("--engine-process", nargs="?", const="on", default="auto", type=engine_process_mode,
                   metavar="on|off|auto",
                   help="run the engine (model, scheduler, step loop) in a child process, so the HTTP side's "
                        "Python and the step loop's run at once rather than sharing one interpreter lock: on, "
                        "off, or auto (on when the model runs on a GPU); the flag alone means on")
    p.add_argument(SAMPLING_FLAG, dest="sampling_defaults", default="{}",
                   type=sampling_defaults_option, metavar="JSON",
                   help="sampling values for requests that leave the field out, as a JSON object of "
                        f"{', '.join(SAMPLING_FIELDS)}, e.g. '{{\"frequency_penalty\": 0.5}}' (the exits "
                        "loop under greedy decoding far more than the full model; docs/training.md "
                        "\"Decoding against the loops\"); a request's own value always wins")
    p.add_argument("--log-level", default=d.log_level, choices=list(LOG_LEVELS),
                   help="how much the server logs: debug adds a line per HTTP request, warning keeps "
                        "only problems")

"""Training recipe. Defaults follow DESIGN §1 (the paper) except the learning rate: 1e-3, the better
of the two rates measured on these machines (DESIGN §4: lower KL ratio than 5e-4 at every point)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from balcony_runtime.model_source import DEFAULT_MODEL
from balcony_runtime.training.data import DataConfig


OBJECTIVES = ("kl", "fisher", "logits")  # the KL through the head, or a head-free metric (training/head_free.py)


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig
    output_dir: str  # checkpoint/, adapters/ and log.jsonl go here
    model: str = DEFAULT_MODEL  # model source (alias, HF directory, .gguf, hub id)
    exits: tuple[int, ...] | None = None  # None: the model's default exits (8, 15, 22 for the default)
    init: str = "last"  # balcony initialisation: "last" (copy of the last layer), "random", or "lens" (closed-form fit)
    lens_tokens: int = 131072  # init="lens": tokens of the training stream the closed-form fit reads
    lens_norm: str = "final"  # init="lens": balcony final norm copied from the backbone's ("final") or layers[k]'s ("exit")
    lens_weighting: str = "none"  # init="lens": per-token weights of the fit ("none" or "relative": 1 / mean(y^2))
    lens_heldout_every: int = 10  # init="lens": every n-th fit batch is held out to choose the ridge strength
    balcony_mlp_width: int | None = None  # grow each balcony's MLP to this many units (function-preserving); None: keep
    init_from: str | None = None  # adapters directory to start from instead (warm start with a new schedule)
    device: str = "auto"  # cpu, cuda, or auto (cuda:<LOCAL_RANK> under torchrun when available)
    autocast: str = "auto"  # bf16 autocast: "auto" (where the device supports it), "bf16" or "off"
    first_sequence: int = 0  # index in the packed stream of the first sequence trained on (skip what a warm start saw)
    micro_batch_size: int = 4  # sequences per forward, per process
    grad_accum: int = 1  # forwards per optimizer step
    total_tokens: int | None = None  # length of the schedule in tokens (or give max_steps)
    max_steps: int | None = None  # length of the schedule in optimizer steps
    stop_after: int | None = None  # stop (with a checkpoint) after this step; the schedule is unchanged
    lr: float = 1e-3  # peak AdamW learning rate
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_fraction: float = 0.01  # linear warm-up over this share of steps, then cosine to 0
    clip_norm: float = 1.0  # global gradient-norm clip
    kl_chunk: int = 512  # positions per chunk of full-vocabulary logits in the KL
    objective: str = "kl"  # "kl" (the paper's), or head-free: "fisher" / "logits" (training/head_free.py)
    reverse_kl_weight: float = 0.0  # objective="kl": b in (1 - b) KL(full || exit) + b KL(exit || full)
    # with data.unlikely_repeats: u, the weight of the unlikelihood term on the exits' own loops
    # (training/repeat_marks.py); 0 only drops the KL inside those loops
    unlikelihood_weight: float = 0.0
    # with data.unlikely_repeats: at each repeated token also the KL toward the full model's
    # distribution without that token (where the probability should go instead of the loop)
    unlikely_anchor: bool = False
    # with data.unlikely_repeats: inside the exits' own answers, the teacher is the full model with
    # this frequency penalty on the answer's tokens so far (0: the plain full model)
    teacher_frequency_penalty: float = 0.0
    # with teacher_frequency_penalty: take that penalised teacher's KL inside the exits' loops too,
    # where the plain teacher would teach looping and so no KL is taken otherwise
    teacher_in_loops: bool = False
    metric_tokens: int = 8192  # objective="fisher": teacher tokens the [H, H] metric is averaged over
    save_every: int = 100  # optimizer steps between checkpoints
    log_every: int = 10  # optimizer steps between progress lines
    snapshot_every: int | None = None  # also export adapters to snapshots/step-N every N steps (curves)
    resume: bool = True  # continue from output_dir/checkpoint when it exists
    adapter_dtype: str = "float16"  # dtype of the exported adapters
    seed: int = 0  # random balcony initialisation
    command: str = ""  # the command line, recorded in the adapters
    extra_meta: dict = field(default_factory=dict)  # recorded in the adapters' training section

    def __post_init__(self) -> None:
        if self.init_from is not None and self.init != "last":
            raise ValueError("give either init_from (start from trained adapters) or init='random'/'lens', not both")
        if self.init not in ("last", "random", "lens"):
            raise ValueError(f"init must be 'last', 'random' or 'lens', got {self.init!r}")
        if self.init == "lens" and (self.lens_tokens < 1 or self.lens_norm not in ("final", "exit")):
            raise ValueError("init='lens' needs lens_tokens >= 1 and lens_norm 'final' or 'exit'")
        if self.balcony_mlp_width is not None and self.balcony_mlp_width < 1:
            raise ValueError(f"balcony_mlp_width must be at least 1, got {self.balcony_mlp_width}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not 0.0 <= self.reverse_kl_weight <= 1.0:
            raise ValueError(f"reverse_kl_weight must be in [0, 1], got {self.reverse_kl_weight}")
        if self.reverse_kl_weight and self.objective != "kl":
            raise ValueError("reverse_kl_weight mixes the KL through the head: it needs objective 'kl'")
        if self.unlikelihood_weight < 0:
            raise ValueError(f"unlikelihood_weight must be at least 0, got {self.unlikelihood_weight}")
        if self.unlikelihood_weight and not self.data.unlikely_repeats:
            raise ValueError("unlikelihood_weight needs data.unlikely_repeats (the marks of the loops it trains against)")
        if self.unlikely_anchor and not self.data.unlikely_repeats:
            raise ValueError("unlikely_anchor needs data.unlikely_repeats (the marks of the repeated tokens)")
        # OpenAI caps a client's penalty at 2; a teacher is not a client, and a larger dose is a
        # training choice the loop rounds measure, so only a negative (rewarding repeats) or
        # non-finite one is refused.
        if not 0.0 <= self.teacher_frequency_penalty < math.inf:
            raise ValueError(f"teacher_frequency_penalty must be a finite number at least 0, "
                             f"got {self.teacher_frequency_penalty}")
        if self.teacher_frequency_penalty and not self.data.unlikely_repeats:
            raise ValueError("teacher_frequency_penalty needs data.unlikely_repeats (the marks of the exits' answers)")
        if self.teacher_in_loops and not self.teacher_frequency_penalty:
            raise ValueError("teacher_in_loops needs teacher_frequency_penalty: the plain teacher inside a loop "
                             "teaches the loop")
        if self.data.unlikely_repeats and (self.objective != "kl" or self.reverse_kl_weight):
            raise ValueError("unlikely repeats go with the forward KL objective only")
        if self.metric_tokens < 1:
            raise ValueError(f"metric_tokens must be at least 1, got {self.metric_tokens}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"autocast must be auto, bf16 or off, got {self.autocast!r}")
        if (self.total_tokens is None) == (self.max_steps is None):
            raise ValueError("give exactly one of total_tokens and max_steps")
        if self.first_sequence < 0:
            raise ValueError(f"first_sequence must be at least 0, got {self.first_sequence}")
        for name in ("micro_batch_size", "grad_accum", "kl_chunk", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.lr <= 0 or self.clip_norm <= 0:
            raise ValueError("lr and clip_norm must be positive")

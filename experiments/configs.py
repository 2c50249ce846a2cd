"""The study's runs: rewired vs baseline from the same code, seeds, a parameter-matched baseline,
position encodings and ablations, and how each run is evaluated.

Every run is the base configuration with a few model fields changed, so that differences come
from those fields alone. ``study(quick=True)`` is the same study shrunk to a smoke test.
"""

from __future__ import annotations

import dataclasses

from runway_jax.config import ModelConfig, upper_half
from runway_jax.data import DataConfig
from runway_jax.training import TrainConfig


@dataclasses.dataclass(frozen=True)
class Run:
    """One trained model: ``group`` names what is compared (seeds of a group are pooled)."""

    group: str
    seed: int
    model: dict  # ModelConfig fields changed from the base
    evaluations: tuple[str, ...]  # of "perplexity", "passkey", "zero_shot", "analysis", "retrieval"
    data: dict = dataclasses.field(default_factory=dict)  # DataConfig fields changed from the base

    @property
    def name(self) -> str:
        return f"{self.group}/seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Study:
    base: TrainConfig
    runs: tuple[Run, ...]
    length_multiples: tuple[int, ...]
    perplexity_windows: int
    passkey_lengths: tuple[int, ...]
    passkey_depths: tuple[float, ...]
    passkey_trials: int
    zero_shot_tasks: tuple[str, ...]
    zero_shot_limit: int
    analysis_windows: int
    recall_flags: tuple[str, ...]  # eval/recall.py flags (it trains its own models)


ALL = ("perplexity", "passkey", "zero_shot", "analysis")
FOLLOW_UP_ABLATIONS = ("span_prefix", "upper_half")
MAIN_GROUPS = ("rewired", "baseline")


def study(quick: bool = False) -> Study:
    # ~0.23M parameters: 4 layers, D = 64, 4 heads of 16 (one of them the runway head when
    # rewired), 2M training tokens: about 2 minutes per run on 2 CPU cores.
    model = ModelConfig(num_layers=4, features=64, num_heads=4, mlp_dim=192)
    base = TrainConfig(model=model, data=DataConfig(seq_len=128, batch_size=16), steps=1000, lr=3e-3,
                       warmup_steps=50, eval_every=1000, eval_batches=40, checkpoint_every=250,
                       log_every=250)
    seeds = (0, 1, 2)
    settings = dict(length_multiples=(1, 2, 4, 8), perplexity_windows=24,
                    passkey_lengths=(256, 512, 1024), passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0),
                    passkey_trials=4, zero_shot_tasks=("arc_easy", "arc_challenge", "hellaswag", "piqa", "csqa"),
                    zero_shot_limit=300, analysis_windows=8,
                    recall_flags=("--pairs=4,8,16", "--seeds=0,1", "--steps=1500"))
    if quick:
        model = model.replace(num_layers=2, features=32, num_heads=2, mlp_dim=64)
        base = base.replace(model=model, data=DataConfig(seq_len=32, batch_size=4), steps=6,
                            warmup_steps=2, eval_every=6, eval_batches=2, checkpoint_every=6, log_every=6)
        seeds = (0, 1)
        settings.update(length_multiples=(1, 2), perplexity_windows=2, passkey_lengths=(48,),
                        passkey_depths=(0.0, 1.0), passkey_trials=1, zero_shot_tasks=("arc_easy",),
                        zero_shot_limit=4, analysis_windows=2,
                        recall_flags=("--pairs=2", "--seeds=0", "--steps=4", "--batch_size=8",
                                      "--num_layers=1", "--eval_batches=1"))
    runs = [Run(group, seed, {"rewire": rewire}, ALL)
            for seed in seeds for group, rewire in (("rewired", True), ("baseline", False))]
    # Parameter matching: a rewired layer has 2*D*d fewer parameters than the standard one with
    # H heads (METHOD (1)) and 2*D*d more than a standard one with its H - 1 attending heads of
    # the same width, so the two baselines bracket it.
    width = model.features // model.num_heads
    runs += [Run("baseline_matched_heads", seed,
                 {"rewire": False, "num_heads": model.num_heads - 1, "head_dim": width},
                 ("perplexity", "zero_shot")) for seed in seeds]
    # NoPE: every seed, because the first seed showed a large gap (baseline 9.8 vs rewired 6.0).
    runs += [Run(f"{name}_nope", seed, {"rewire": rewire, "position": "nope"}, ("perplexity", "passkey"))
             for seed in seeds for name, rewire in (("rewired", True), ("baseline", False))]
    ablations = {"beta_0.25": {"beta": 0.25}, "beta_0.5": {"beta": 0.5}, "beta_2": {"beta": 2.0},
                 "span_prefix": {"runway_span": "prefix"}, "coefficient_dot": {"runway_coefficient": "dot"},
                 "upper_half": {"rewire_layers": upper_half(model.num_layers)}}
    runs += [Run(f"rewired_{name}", 0, {"rewire": True, **fields}, ("perplexity",))
             for name, fields in ablations.items()]
    # Ablations whose seed-0 result fell outside the rewired seeds' spread get the other seeds.
    runs += [Run(f"rewired_{name}", seed, {"rewire": True, **ablations[name]}, ("perplexity",))
             for name in FOLLOW_UP_ABLATIONS for seed in seeds[1:]]
    if quick:  # one run of each kind
        keep = {"rewired", "baseline", "baseline_matched_heads", "rewired_nope", "rewired_beta_0.5"}
        runs = [run for run in runs if run.group in keep and (run.seed == 0 or run.group in MAIN_GROUPS)]
    return Study(base=base, runs=tuple(runs), **settings)


def run_config(base: TrainConfig, run: Run) -> TrainConfig:
    return base.replace(model=base.model.replace(**run.model), seed=run.seed,
                        data=dataclasses.replace(base.data, shuffle_seed=run.seed, **run.data))

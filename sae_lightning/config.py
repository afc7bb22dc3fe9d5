"""The training config as typed specs, checked whole before any work is done or anything written.

:func:`load_config` resolves the composed Hydra config and parses it with the one parser of
``spec.py`` into a :class:`TrainConfig`: every section typed, every value checked, the
allocator's budget checked against the dictionary and batch sizes. What passes builds:
``train.run`` then builds each object once from it. Every default is written once, in its
spec: Hydra gets them from here (:func:`register_defaults` stores each spec's defaults in its
ConfigStore), and the variant and data YAML under ``configs/`` compose those nodes and add only
their choices (which allocator, which loss terms, which cache).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast, get_args

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .allocators import Allocator, AllocatorConfig, get_allocator_class
from .data import DataSpec
from .errors import ConfigError, did_you_mean, require
from .losses import LossTerm, build_losses
from .sae import AffinityDtype, BPreInit, DecoderNorm, Normalisation
from .spec import as_dict, check_keys, parse, setting

ProgressMode = Literal["auto", "bar", "lines", "none"]
EncoderScale = Literal["fit", "gao", "none"]


@dataclass
class ModelSpec:
    """``model``: the autoencoder (docs/method_choices.md says why each default)."""

    n_latents: int = setting(4096, ge=1)  # F, the dictionary size
    normalisation: Normalisation = "dataset_scale"  # none | dataset_scale | layernorm
    b_pre_init: BPreInit = "geometric_median"  # geometric_median | mean | zeros
    init_sample_tokens: int = setting(8192, ge=1)  # tokens that set the scale and b_pre
    # fit (least squares on the sample) | gao (unit gain on random directions) | none
    init_encoder_scale: EncoderScale = "fit"
    # auto | float32 | bfloat16: the affinity matrix batch selection reads. bfloat16: candidates
    # there, re-scored in float32 (the same pairs as float32 up to its own rounding; rescore.py);
    # thresholds, calibration and the values always float32. auto: bfloat16 on a CPU with a bf16
    # product in hardware (AMX or AVX512_BF16), where the step is faster, else float32 (docs/performance.md)
    affinity_dtype: AffinityDtype = "auto"
    # latents per block of the affinity matrix: selection, thresholds and the auxiliary losses
    # compute z' a block at a time and never hold [B, F]. auto: the dense matrix while it holds
    # at most 2^29 entries (2 GiB in fp32), else blocks of 2^27 / B latents (the measured
    # choice, docs/performance.md); null: always the dense matrix
    block_latents: int | Literal["auto"] | None = setting(
        "auto", ge=1, allowed="auto, null (the dense matrix) or an integer >= 1"
    )
    # unit: decoder rows held at norm 1 (gradient projection, renormalisation); free: their norms
    # train, and selection ranks z'_j·‖d_j‖ (SAELens's rescale_acts_by_decoder_norm)
    decoder_norm: DecoderNorm = "free"
    decoder_init_norm: float | None = setting(
        None, gt=0, allowed="null (unit rows, the encoder as drawn) or a number > 0 (with decoder_norm=free)"
    )  # rows of this norm at init, the encoder tied to them (W_enc = W_dec, SAELens's 0.1)

    def check(self, prefix: str) -> None:
        require(
            self.decoder_init_norm is None or self.decoder_norm == "free",
            f"{prefix}.decoder_init_norm",
            self.decoder_init_norm,
            "null with model.decoder_norm=unit (the rows are renormalised to 1 after every step)",
        )


@dataclass
class OptimSpec:
    """``optim``: Adam and its schedule."""

    # null: 2e-4 / sqrt(n_latents / 2^14) (Gao et al.)
    lr: float | None = setting(None, gt=0, allowed="null (2e-4 / sqrt(n_latents / 2^14)) or a number > 0")
    # linear learning-rate warm-up; docs/parity.md: a warm-up costs a short run most of its FVU lead
    warmup_steps: int = setting(0, ge=0)
    # Adam's (β1, β2) and ε (Gao et al.'s)
    betas: list[float] = setting(default_factory=lambda: [0.9, 0.999], ge=0, lt=1, allowed="two numbers in [0, 1)")
    eps: float = setting(6.25e-10, gt=0)  # Adam's ε
    # the fused Adam kernel (CPU and GPU); auto: fused, except under mixed precision
    fused: Literal["auto"] | bool = setting("auto", allowed="one of 'auto', true, false")
    # the global L2 norm of all gradients, clipped to this before each step (null: no clipping). The
    # module applies it itself (SAEModule.configure_gradient_clipping): any Trainer trains as train.py does
    clip_grad_norm: float | None = setting(1.0, gt=0, allowed="null (no clipping) or a number > 0")

    def check(self, prefix: str) -> None:
        require(len(self.betas) == 2, f"{prefix}.betas", self.betas, "two numbers in [0, 1)")


@dataclass
class StatsSpec:
    """``stats``: the latent statistics (dead, density, under-used)."""

    # dead = not fired for this many training tokens (Gao et al.: 10M at scale)
    dead_window_tokens: int = setting(200_000, ge=1, allowed="an integer >= 1 (tokens)")
    # the firing-density EMA's time constant, in tokens
    density_time_constant_tokens: int = setting(100_000, ge=1, allowed="an integer >= 1 (tokens)")
    # under-used = dead, or density < ratio x the reference at its rank
    underused_ratio: float = setting(0.25, ge=0)
    # fitted (the run's own density curve, a Zipf fit) | zipf (the curve below)
    underused_reference: Literal["fitted", "zipf"] = "fitted"
    # the zipf reference: Zipf(alpha, beta) targets water-filled to sum k
    zipf_alpha: float = setting(1.0, ge=0)
    zipf_beta: float = setting(0.0, gt=-1)  # the zipf reference's β: targets ∝ (rank + β)^-α


@dataclass
class CalibrationSpec:
    """``calibration``: the inference thresholds, set on held-out tokens when training ends."""

    enabled: bool = True  # calibrate the thresholds on data.calibration_tokens when training ends
    match_l0: bool = True  # then scale the calibrated thresholds by one factor so that L0 = k on the calibration tokens
    # also before every validation during training: the threshold mode (and val/threshold/fvu_at_k,
    # the headline) is then measured along training, a learning curve (benchmarks.long); one
    # calibration per validation. The thresholds serve inference only: training is unchanged
    every_validation: bool = False


@dataclass
class EvaluationSpec:
    """The final validation's extra figures (docs/method_choices.md, description length)."""

    description_length: bool = True  # bits per token of each mode's codes (sae_lightning/description_length.py)
    dl_tolerance: float = setting(0.01, gt=0)  # the precision: coarsest keeping FVU within this (relative)
    # after training, on the test split: the SAE read by these inference rules (rules.py), each
    # scaled to L0 = k on the calibration tokens; all: topk, global_threshold, latent_thresholds;
    # own: the one its allocator implies; none: no test figures
    test_rules: Literal["all", "own", "none"] = "all"
    # also the own rule's description length at each factor of its test sweep (the DL-against-FVU
    # curve, read at a common FVU across configurations: the MDL-SAE comparison); ~6 DLs: off by default
    dl_curve: bool = False


@dataclass
class LoggingSpec:
    histogram_every_n_steps: int = setting(200, ge=0)  # TensorBoard histograms every this many steps (0: none)


@dataclass
class VariantSpec:
    """A variant: its name, its allocator with that allocator's own config, its loss terms."""

    name: str
    allocator: str
    params: AllocatorConfig
    losses: dict[str, LossTerm]
    allocator_class: type[Allocator] = dataclasses.field(repr=False, compare=False)  # looked up once, by parsing

    META: ClassVar[tuple[str, ...]] = ("name", "allocator", "losses")

    def label(self) -> str:
        """The variant's name with what tells its runs apart beyond k (Feature Choice's capacity
        rule: ``feature_choice-demand``), for run folder names."""
        capacity = getattr(self.params, "capacity", None)
        return f"{self.name}-{capacity}" if isinstance(capacity, str) else self.name

    def build_allocator(self, n_latents: int, batch_size: int) -> Allocator:
        return self.allocator_class(self.params, n_latents, batch_size)

    @classmethod
    def from_raw(cls, raw: Any, prefix: str) -> VariantSpec:
        if not isinstance(raw, dict):
            raise ConfigError(prefix, raw, "a mapping (a config section)")
        name = raw.get("name")
        require(isinstance(name, str) and bool(name), f"{prefix}.name", name, "a name for the variant")
        allocator = get_allocator_class(raw.get("allocator"))
        params = parse(
            allocator.Config,
            {k: v for k, v in raw.items() if k not in cls.META},
            prefix,
            what=f"allocator {allocator.name!r} (or name, allocator, losses)",
        )
        losses = raw.get("losses")
        if losses is not None and not isinstance(losses, dict):
            raise ConfigError(f"{prefix}.losses", losses, "a mapping {loss_name: {param: value}} or null")
        terms = build_losses(losses, f"{prefix}.losses")
        if "sparsity" in terms and not allocator.learns_thresholds:
            raise ConfigError(
                f"{prefix}.losses.sparsity",
                as_dict(terms["sparsity"]),
                f"no sparsity term for {allocator.name}: it acts on learned thresholds (variant.allocator=jumprelu)",
            )
        return cls(str(name), allocator.name, params, terms, allocator)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "allocator": self.allocator,
            **as_dict(self.params),
            "losses": {n: as_dict(t) for n, t in self.losses.items()},
        }


# Trainer arguments the run sets itself (progress=... replaces enable_progress_bar)
TRAINER_OWN = ("logger", "callbacks", "plugins", "default_root_dir", "enable_model_summary", "enable_progress_bar")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


@dataclass
class TrainerSpec:
    """Keyword arguments of ``lightning.Trainer``: keys from its own signature, the values this
    project depends on checked here, the rest by a dry construction of the Trainer."""

    args: dict[str, Any]

    @property
    def max_steps(self) -> int:
        return self.args["max_steps"]

    @classmethod
    def from_raw(cls, raw: Any, prefix: str) -> TrainerSpec:
        import lightning as L

        if not isinstance(raw, dict):
            raise ConfigError(prefix, raw, "a mapping of lightning.Trainer arguments")
        if "enable_progress_bar" in raw:
            raise ConfigError(
                f"{prefix}.enable_progress_bar",
                raw["enable_progress_bar"],
                "no value here: the top-level key progress=auto|bar|lines|none chooses how training progress is shown",
            )
        for key in TRAINER_OWN:
            if key in raw:
                raise ConfigError(f"{prefix}.{key}", raw[key], "not set here: the run sets it itself")
        known = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self" and p not in TRAINER_OWN]
        check_keys(raw, known, prefix, what="lightning.Trainer's arguments")
        t = cls._checked_values(dict(raw), prefix)
        cls._dry_run(t, prefix)
        return cls(t)

    @staticmethod
    def _checked_values(t: dict, prefix: str) -> dict:
        """The values this project depends on (an int where Lightning would also take a float, ...)."""
        from lightning.fabric.connector import _PRECISION_INPUT_INT, _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
        from lightning.pytorch.strategies import StrategyRegistry

        def check(key: str, tp: Any, **range_):
            from .spec import convert

            if key in t:
                t[key] = convert(t[key], tp, f"{prefix}.{key}", range_)

        check("max_steps", int, ge=1)
        require("max_steps" in t, f"{prefix}.max_steps", None, "an integer >= 1")
        check(
            "val_check_interval",
            int | float | None,
            allowed="null, an integer >= 1 (training steps between validations) or a fraction in (0, 1]",
        )
        v = t.get("val_check_interval")
        require(
            v is None or (isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v <= 1),
            f"{prefix}.val_check_interval",
            v,
            "null, an integer >= 1 (training steps between validations) or a fraction in (0, 1]",
        )
        check("check_val_every_n_epoch", int | None, ge=1)
        check("limit_val_batches", int | float, ge=0)
        lv = t.get("limit_val_batches", 1.0)
        require(
            not isinstance(lv, float) or lv <= 1,
            f"{prefix}.limit_val_batches",
            lv,
            "an integer >= 0 (batches) or a fraction in [0, 1]",
        )
        check("log_every_n_steps", int, ge=1)
        check("accumulate_grad_batches", int, ge=1)
        for key in ("gradient_clip_val", "gradient_clip_algorithm"):  # the module clips (OptimSpec.clip_grad_norm)
            require(
                t.get(key) is None,
                f"{prefix}.{key}",
                t.get(key),
                "null: the SAE module clips its own gradients, so that the recipe travels with it; set "
                "optim.clip_grad_norm (a number > 0, or null for none) instead",
            )
        check("deterministic", bool | Literal["warn"], allowed="true, false or 'warn'")
        check("accelerator", Literal[ACCELERATORS])
        d = t.get("devices", "auto")
        require(
            d == "auto"
            or (isinstance(d, int) and not isinstance(d, bool) and (d >= 1 or d == -1))
            or (isinstance(d, list) and bool(d) and all(isinstance(i, int) for i in d)),
            f"{prefix}.devices",
            d,
            "auto, an integer >= 1 (-1: all), or a list of device indices",
        )
        strategies = ["auto", *StrategyRegistry.available_strategies()]
        st = t.get("strategy", "auto")
        require(
            st in strategies,
            f"{prefix}.strategy",
            st,
            "a Lightning strategy: auto, ddp, ddp_spawn, ddp_fork, fsdp, "
            f"deepspeed, ... (lightning.pytorch.strategies.StrategyRegistry){did_you_mean(str(st), strategies)}",
        )
        main = get_args(_PRECISION_INPUT_STR)
        precisions = [*main, *get_args(_PRECISION_INPUT_INT), *get_args(_PRECISION_INPUT_STR_ALIAS)]
        require(
            t.get("precision", "32-true") in precisions,
            f"{prefix}.precision",
            t.get("precision"),
            "one of " + ", ".join(repr(p) for p in main) + " (or the short forms 64, 32, 16, 'bf16')",
        )
        return t

    @staticmethod
    def _dry_run(t: dict, prefix: str) -> None:
        """What Lightning itself refuses (an accelerator this machine lacks, devices it does not
        have, ...), named by the key that makes it fail: the hardware keys are added one at a time
        to a trainer without them, and the first whose addition fails is the culprit."""
        rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
        level = rank_zero.level
        rank_zero.setLevel(logging.ERROR)
        try:
            error = _construct_trainer(t)
            if error is None:
                return
            key, base = None, {k: v for k, v in t.items() if k not in HARDWARE_KEYS}
            if _construct_trainer(base) is None:
                for k in (k for k in HARDWARE_KEYS if k in t):
                    base[k] = t[k]
                    if _construct_trainer(base) is not None:
                        key = k
                        break
            message = " ".join(str(error).split())[:300]
            raise ConfigError(
                f"{prefix}.{key}" if key else prefix,
                t.get(key) if key else t,
                f"a setting Lightning accepts on this machine ({message})",
            )
        finally:
            rank_zero.setLevel(level)

    def as_dict(self) -> dict:
        return dict(self.args)


HARDWARE_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision")


def _construct_trainer(args: dict) -> Exception | None:
    """The exception a Trainer with these arguments raises, or None."""
    import lightning as L

    try:
        L.Trainer(
            **args, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
        )
    except Exception as e:  # MisconfigurationException, ValueError, RuntimeError, ...
        return e
    return None


@dataclass
class TrialSpec:
    """Set by the sweeper: the Optuna trial this run is, and how it is pruned."""

    storage: str
    study: str
    trial_id: int
    number: int
    fvu_key: str
    l0_key: str
    pruning: bool
    min_trials: int = setting(ge=1)  # the sweeper passes its pruner's settings (sweep/settings.py)
    margin: float = setting(ge=0)


@dataclass
class TrainConfig:
    variant: VariantSpec
    data: DataSpec
    trainer: TrainerSpec
    seed: int = 0  # the training seed (the data have their own: data.seed)
    out_dir: str = "outputs"  # runs go to <out_dir>/runs/, sweeps to <out_dir>/sweeps/
    # a run folder (or a checkpoint file) to continue, in place: python train.py resume=outputs/runs/<run>
    resume: str | None = setting(None, allowed="null, a checkpoint file (.ckpt) or a run folder (outputs/runs/<run>)")
    progress: ProgressMode = "auto"  # auto (a bar on a terminal, plain lines in a log file) | bar | lines | none
    model: ModelSpec = setting(default_factory=ModelSpec)
    optim: OptimSpec = setting(default_factory=OptimSpec)
    stats: StatsSpec = setting(default_factory=StatsSpec)
    calibration: CalibrationSpec = setting(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = setting(default_factory=EvaluationSpec)
    logging: LoggingSpec = setting(default_factory=LoggingSpec)
    sweep_trial: TrialSpec | None = (
        None  # set by the Optuna sweeper: the trial this run is (storage, study, id, pruning)
    )

    def check(self, prefix: str) -> None:
        self.variant.allocator_class.check_fits(
            self.variant.params, self.model.n_latents, self.data.batch_size, "variant"
        )

    def as_dict(self) -> dict:
        out = {f.name: as_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["variant"], out["trainer"], out["data"] = (
            self.variant.as_dict(),
            self.trainer.as_dict(),
            self.data.as_dict(),
        )
        return out


def resolve(cfg: DictConfig | dict) -> dict:
    """The config as a plain dict with every interpolation resolved (Hydra's own section dropped)."""
    if not isinstance(cfg, DictConfig):
        out = dict(cfg)
    else:
        try:
            out = cast(dict, OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True))
        except MissingMandatoryValue as e:
            raise ConfigError(
                str(e.full_key), "???", "a value: this key has no default (set it on the command line)"
            ) from e
    out.pop("hydra", None)
    out.pop("sweeps", None)  # the sweep preset group, when a preset only sets hydra keys
    return out


# the config's spec sections, each a dataclass holding its defaults: the one table that
# normalised(), ModuleSpec and Hydra's defaults (register_defaults) read
SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "optim": OptimSpec,
    "stats": StatsSpec,
    "calibration": CalibrationSpec,
    "evaluation": EvaluationSpec,
    "logging": LoggingSpec,
}


@dataclass
class ModuleSpec:
    """What :class:`~sae_lightning.module.SAEModule` is built from, parsed once: the sections it
    reads and the batch size its allocator's capacities are set for."""

    model: ModelSpec
    variant: VariantSpec
    optim: OptimSpec
    stats: StatsSpec
    evaluation: EvaluationSpec
    logging: LoggingSpec
    batch_size: int

    READS: ClassVar[tuple[str, ...]] = ("model", "optim", "stats", "evaluation", "logging")

    @classmethod
    def of(cls, config: TrainConfig | dict) -> ModuleSpec:
        """From a run's typed config, or from the config dict a checkpoint stores (whatever else
        it holds: the trainer's and the data's sections are not the module's)."""
        if isinstance(config, TrainConfig):
            sections = {key: getattr(config, key) for key in cls.READS}
            return cls(variant=config.variant, batch_size=config.data.batch_size, **sections)
        sections = {key: parse(SECTIONS[key], config.get(key), key) for key in cls.READS}
        variant = VariantSpec.from_raw(config.get("variant"), "variant")
        return cls(variant=variant, batch_size=int(config["data"]["batch_size"]), **sections)


def normalised(raw: dict) -> dict:
    """A config dict with every section but ``trainer`` parsed and written back whole (defaults
    filled in, types settled), so that two configs compare by what they mean; the trainer
    section stays as given (it is only checked against the machine a run starts on)."""
    out = dict(raw)
    for key, cls in SECTIONS.items():
        out[key] = as_dict(parse(cls, raw.get(key), key))
    out["variant"] = VariantSpec.from_raw(raw.get("variant"), "variant").as_dict()
    out["data"] = DataSpec.from_raw(raw.get("data"), "data").as_dict()
    if out["data"].get("order_seed") is None:  # as load_config resolves it
        out["data"]["order_seed"] = raw.get("seed", 0)
    if out["data"].get("test_tokens") is None:
        out["data"]["test_tokens"] = out["data"]["val_tokens"]
    if raw.get("sweep_trial") is not None:
        out["sweep_trial"] = as_dict(parse(TrialSpec, raw["sweep_trial"], "sweep_trial"))
    return out


def load_config(cfg: DictConfig | dict) -> TrainConfig:
    """The composed config, resolved, typed and checked (ConfigError on the first problem);
    ``data.order_seed: null`` becomes the training seed and ``data.test_tokens: null`` the
    number of validation tokens (written so into the run's config)."""
    config = parse(TrainConfig, resolve(cfg), "")
    if config.data.order_seed is None:
        config.data.order_seed = config.seed
    if config.data.test_tokens is None:
        config.data.test_tokens = config.data.val_tokens
    return config


def register_defaults() -> None:
    """Give Hydra the specs' defaults (called by the plugin shim, which Hydra imports before it
    composes): ``model=default`` is ModelSpec's, the node ``spec_defaults`` (first in
    train.yaml's defaults list) holds the top-level sections, and ``spec/allocator/<name>`` and
    ``spec/loss/<name>`` the keys a variant file composes, ``spec/data/<kind>`` and
    ``spec/harvest`` those of a data file. So each default is written once, in
    its spec; ``python train.py --cfg job`` shows them all."""
    from hydra.core.config_store import ConfigStore

    from .allocators import ALLOCATORS
    from .data import DATA_KINDS
    from .data.harvest_spec import HarvestSpec
    from .losses import LOSSES

    cs = ConfigStore.instance()
    cs.store(group="model", name="default", node=as_dict(ModelSpec()), provider="sae_lightning")
    top = {
        f.name: as_dict(f.default)
        for f in dataclasses.fields(TrainConfig)
        if f.name not in SECTIONS and f.default is not dataclasses.MISSING
    }  # seed, out_dir, resume, progress, sweep_trial
    # the model's defaults are the group model=default (above); the other sections' are here
    node = {**top, **{k: as_dict(cls()) for k, cls in SECTIONS.items() if k != "model"}}
    cs.store(name="spec_defaults", node=node, provider="sae_lightning")
    # what a variant file composes: its allocator's keys and its loss terms' keys, with their defaults
    for name in ALLOCATORS:
        cs.store(group="spec/allocator", name=name, node=as_dict(ALLOCATORS[name].Config()), provider="sae_lightning")
    for name in LOSSES:
        cs.store(group="spec/loss", name=name, node=as_dict(LOSSES[name]()), provider="sae_lightning")
    # what a data file composes: its kind's keys (a required key stays ??? until the file sets it)
    for name in DATA_KINDS:
        kind = DATA_KINDS[name]
        required = {
            f.name: "???"
            for f in dataclasses.fields(kind)
            if f.init
            and f.name != "kind"
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        }
        cs.store(group="spec/data", name=name, node=as_dict(kind(kind=name, **required)), provider="sae_lightning")
    cs.store(group="spec", name="harvest", node=as_dict(HarvestSpec()), provider="sae_lightning")

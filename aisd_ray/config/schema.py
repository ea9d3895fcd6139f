"""The schema: one typed dataclass per concern, and each key's allowed values.

Plain data, no behaviour beyond turning itself into a dict or TOML: loading is ``load.py``, the
original's INI ``ini.py``, value typing ``coerce.py``, the rules ``rules.py``, the search space
``space.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w


class ConfigError(ValueError):
    """A config file, section, key or value that cannot be used."""


SPLITS = ("train", "valid", "test")  # a shard store's splits, in this order

# The official AISD test cases: the raw release's test split.
AISD_TEST_CASES: tuple[str, ...] = (
    "0073410", "0072723", "0226290", "0537908", "0538058", "0091415", "0538780", "0073540", "0226188",
    "0226258", "0226314", "0091507", "0226298", "0538975", "0226257", "0226142", "0072681", "0091538",
    "0538983", "0537961", "0091646", "0072765", "0226137", "0091621", "0091458", "0021822", "0538319",
    "0226133", "0091657", "0537925", "0073489", "0538502", "0091476", "0226136", "0538532", "0073312",
    "0539025", "0226309", "0226307", "0091383", "0021092", "0537990", "0226299", "0073060", "0538505",
    "0073424", "0091534", "0226125", "0072691", "0538425", "0226199", "0226261",
)


@dataclass
class ModelConfig:
    """FlexUNet hyper-parameters (names follow the original's ``[model]`` section)."""

    image_width: int = 128
    image_height: int = 128
    image_channels: int = 3
    num_classes: int = 2
    base_filters: int = 16
    base_kernels: tuple[int, int] = (5, 5)
    num_layers: int = 4
    dropout_rate: float = 0.05
    dilation: tuple[int, int] = (1, 1)
    activation: str = "relu"
    final_activation: str = "sigmoid"
    input_normalize: bool = True
    normalization: bool = False
    # BatchNormalization's moving-average momentum (Keras' default 0.99, as the original): short runs
    # of a few hundred steps want less (0.9), or validation sees statistics of the untrained network.
    bn_momentum: float = 0.99


@dataclass
class DataConfig:
    """Where slices come from, how they are categorised and how they are sharded."""

    # AISD-like tree with {train,valid,test}/{images,masks}; empty means "use split_dirs".
    source_dir: str = ""
    # Per-split (images_dir, masks_dir), as the original's [train]/[valid]/[test] sections give them.
    split_dirs: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Where shards and manifest.json live (local folder or object-store URI).
    shards_dir: str = ""
    shard_format: str = "parquet"
    # How a row holds its pixels: "png" (PNG files, decoded by the input pipeline) or "raw" (uint8
    # arrays, zstd-compressed, grey stored as one channel: no decoding, a few times the bytes).
    row_encoding: str = "png"
    # tf.data guidance: shards of 100 MB+; capped so every worker gets one.
    shard_target_mb: float = 128.0
    min_shards: int = 2
    # CT volumes only: processes that read and window the cases side by side during `prepare`
    # (`prepare --workers`); 0: this machine's CPU count (at most one per case). The store is the
    # same whatever the number. With train.backend = "ray" on a running Ray (a cluster job, the
    # pipeline) the cases are Ray tasks instead.
    prepare_workers: int = 0
    # Colour of each class in mask PNGs, index = class id (seed: rgb_map).
    rgb_map: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (255, 255, 255))
    # A mask pixel farther than this (Euclidean, RGB units) from every rgb_map colour is an error
    # naming the file: a mask in another palette must not turn silently into background.
    mask_colour_tolerance: float = 64.0
    # How mask files become class ids (the rule: aisd_ray/data/sources/masks.py): "colours" (nearest rgb_map
    # colour), "class_ids" (values 0..num_classes-1, nnU-Net's convention), "raw_labels" (the raw AISD
    # release's 0..5, mapped by raw_label_map) or "auto": per split (per folder for `evaluate
    # --predictions/--masks`), the first reading every mask of it fits; none, or masks that disagree,
    # are an error naming a file and its values.
    mask_values: str = "auto"
    class_names: tuple[str, ...] = ("background", "lesion")
    # Raw AISD release only: class id of each raw label value 0..5 (1 remote infarct, 2 clear acute,
    # 3 blurred acute, 4 invisible acute, 5 infarct); lesion = {1, 2, 3, 5}, label 4 is background.
    raw_label_map: tuple[int, ...] = (0, 1, 1, 1, 0, 1)
    test_cases: tuple[str, ...] = AISD_TEST_CASES
    # The other cases go to train/valid by patient: this share to valid, shuffled by split_seed.
    valid_fraction: float = 0.15
    split_seed: int = 2024
    # Patient k-fold cross-validation (`aisd-ray crossval --folds K` sets both): with folds >= 2 the
    # non-test cases, shuffled by split_seed, are dealt into `folds` folds (case i of the shuffled
    # list to fold i mod folds) and fold `fold` is the valid split, the others train; valid_fraction
    # is then unused. 0: no folds, valid_fraction decides.
    folds: int = 0
    fold: int = 0
    # Leave slices without lesion out of the train split (the original's derived set did); valid and
    # test keep every slice, so that evaluation sees whole cases.
    drop_empty_train: bool = False
    # Foreground-aware sampling (nnU-Net oversamples foreground): at least this share of each
    # worker's training rows per epoch contain lesion; lesion slices are drawn again in place of
    # lesion-free ones until it holds. 0 trains on the split as it is.
    foreground_fraction: float = 0.0
    # A train or valid split without a single lesion pixel is almost always a mask-reading mistake:
    # prepare warns and train (and tune) refuse such a store (exit 2) unless this says it is intended.
    allow_lesion_free_splits: bool = False
    # CT volumes (DICOM series, NIfTI, nnU-Net datasets) only: the HU windows that make the model's
    # input channels, (level, width) in HU each: one window is replicated to every channel (the AISD
    # PNGs are one brain window as grey RGB), or one window per channel. A value v in HU becomes
    # 255 * clip((v - (level - width / 2)) / width, 0, 1). Brain window: level 40, width 80.
    windows: tuple[tuple[float, float], ...] = ((40.0, 80.0),)
    # CT volumes only: what the model's input channels hold (aisd_ray/data/ct/channels.py): "grey" (the
    # windows above, as the AISD PNGs), "neighbours" (slices k-1, k, k+1 through the first window),
    # "windows" (three windows, one per channel) or "symmetry" (the slice, its mirror about the
    # head's midline, and their difference 128 + (slice - mirror) / 2). All but grey need 3 channels.
    channels: str = "grey"


# "original" and "raw" are PNG slices; "nnunet" (NIfTI volumes in nnU-Net's raw dataset layout) and
# "dicom" (a DICOM series folder per case, label NIfTIs beside them) are CT volumes in HU.
SYNTHETIC_LAYOUTS = ("original", "raw", "nnunet", "dicom")
VOLUME_LAYOUTS = ("nnunet", "dicom")
SYNTHETIC_ANATOMIES = ("realistic", "simple")  # synthetic.anatomy (data/synthetic/heads.py)


@dataclass
class SyntheticConfig:
    """The AISD-like generator used by the demo and the tests.

    ``layout = "original"`` writes the original FlexUNet's ``AISD/{train,valid,test}/{images,masks}``
    tree of independent slices (``num_train``/``num_valid``/``num_test``, ``lesion_free_fraction``);
    ``"raw"`` writes the raw release's per-case folders: ``num_cases`` patients of
    ``slices_per_case`` slices, one lesion per patient spanning neighbouring slices, the first
    ``num_test_cases`` patients carrying official test IDs (prepare then splits by patient);
    ``"nnunet"`` and ``"dicom"`` write the same patients as int16 HU volumes (0.45 mm in-plane at
    512 px, 5 mm slices) in nnU-Net's raw dataset layout or as DICOM series, the lesion a faint
    hypodensity of ``lesion_hu`` below the parenchyma around it. ``anatomy`` (volume layouts):
    "realistic" heads (skull base, orbits, sinuses, ventricles, cisterns, calcifications, scalp,
    holder, beam-hardening streaks, and the dark mimics labelled background: old infarcts, lacunes,
    leukoaraiosis; the lesion in a vascular territory) or the "simple" ellipse heads of before, which
    reproduce earlier figures bit for bit."""

    layout: str = "original"
    num_train: int = 240
    num_valid: int = 48
    num_test: int = 48
    size: int = 512
    lesion_free_fraction: float = 0.2
    num_cases: int = 44
    slices_per_case: int = 8
    num_test_cases: int = 6
    seed: int = 2024
    # volume layouts: how many HU the lesion lies below the parenchyma (early ischaemic change is a
    # few HU), and the image noise's standard deviation in HU
    lesion_hu: float = 5.0
    noise_hu: float = 3.0
    anatomy: str = "realistic"  # volume layouts: "realistic" or "simple" (the ellipse heads before issue 31)


@dataclass
class AugmentConfig:
    """Online augmentation of training batches (off by default, as in the original's AISD run).

    Each range is sampled uniformly per example; image and mask move together."""

    enabled: bool = False
    hflip: bool = True  # left-right: the hemispheres are mirror images
    vflip: bool = False
    rotation_deg: float = 10.0  # +/- degrees
    scale: tuple[float, float] = (0.9, 1.1)  # < 1 shrinks
    shear_deg: float = 5.0  # +/- degrees, horizontal
    brightness: float = 0.05  # +/- fraction of full scale
    contrast: tuple[float, float] = (0.9, 1.1)


@dataclass
class TrainConfig:
    """The training loop: optimiser, schedule, stopping, workers."""

    epochs: int = 10
    batch_size: int = 8  # per worker
    learning_rate: float = 1e-3
    # Gradient clipping, applied to the all-reduced (global) gradient, so the update is the same at
    # any worker count: by value as the original does, or by global norm (clipnorm; set clipvalue = 0).
    clipvalue: float = 0.5
    clipnorm: float = 0.0
    adam_epsilon: float = 1e-7  # Keras' default, as the original
    # Learning-rate schedule: "plateau" (halve on a val_loss plateau, as the original), "cosine"
    # (decay to min_learning_rate over the epochs) or "constant"; each after a linear warm-up.
    lr_schedule: str = "plateau"
    warmup_epochs: int = 0
    loss: str = "ce_dice"
    patience: int = 10
    learning_rate_reducer: bool = True
    reducer_factor: float = 0.5
    reducer_patience: int = 4
    min_learning_rate: float = 1e-7
    # Divergence guard: a non-finite loss, or a collapse (no lesion pixel predicted on train or
    # validation for collapse_patience epochs after an epoch that found lesions), either rolls back
    # to the best epoch's weights with the learning rate times rollback_factor ("rollback", at most
    # max_rollbacks times), ends the run with a clear reason ("stop"), or is only logged ("ignore").
    on_collapse: str = "rollback"
    collapse_patience: int = 3
    rollback_factor: float = 0.5
    max_rollbacks: int = 3
    steps_per_epoch: int = 0  # 0: one pass over the worker's share
    validation_steps: int = 0  # 0: the whole validation split
    # Where no progress bar can be drawn (job logs, kubectl logs, files), a progress line every this
    # many seconds inside an epoch, so a long epoch never looks hung; 0: none.
    log_every_seconds: float = 60.0
    epoch_change_infer: bool = True
    num_infer_images: int = 6
    seed: int = 137
    deterministic: bool = True  # TF op determinism: same seed, same numbers (a little slower)
    backend: str = "ray"
    num_workers: int = 2
    use_gpu: bool = False
    # How Ray places the workers (its placement group strategy): "PACK" (Ray's default: as few
    # nodes as fit), "SPREAD", "STRICT_PACK" (one node) or "STRICT_SPREAD" (each on its own node).
    placement_strategy: str = "PACK"
    # Ray FailureConfig: a lost or failed worker group restarts from the latest checkpoint this many
    # times (spot VMs get preempted); 0 ends the run at the first failure.
    max_failures: int = 2
    # Rows (still encoded) each worker shuffles over, after its share of the epoch's permuted shard
    # order; at least the share itself gives a uniform permutation of it.
    shuffle_buffer: int = 1024
    # Where a worker's training rows come from: "shards" (every backend reads its share straight
    # from the shards in a (seed, epoch)-keyed order: reproducible, disjoint across workers) or
    # "ray_data" (Ray Data streams equal shares; block order fixed by train.seed, rows shuffled per epoch).
    reader: str = "shards"
    # reader = "ray_data": read the training shards once into Ray's object store (it spills to disk
    # when full) instead of streaming them again every epoch.
    cache_train_split: bool = False
    # GPU switches: "none" | "bf16" | "fp16" (fp16 with dynamic loss scaling), XLA for the step.
    mixed_precision: str = "none"
    jit_compile: bool = False


# What a search may vary, and the [model]/[train] key each lands on.
SEARCHABLE = {"learning_rate": "train", "base_kernels": "model", "dilation": "model", "base_filters": "model",
              "num_layers": "model", "dropout_rate": "model"}
DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")
WHOLE_NUMBER_KEYS = ("base_kernels", "dilation", "base_filters", "num_layers")


def _default_space() -> dict[str, dict[str, tuple[float, ...]]]:
    return {"learning_rate": {"loguniform": (1e-4, 1e-2)}, "base_kernels": {"choice": (5, 7, 9)},
            "dilation": {"choice": (1, 2, 3)}}


@dataclass
class TuneConfig:
    """``aisd-ray tune``: the search space, the scheduler and the budget.

    ``space`` gives each searched key one distribution: ``{loguniform = [low, high]}``,
    ``{uniform = [low, high]}``, ``{choice = [...]}`` or ``{grid = [...]}`` (every value, in
    order, times num_samples). Keys: learning_rate, base_kernels and dilation (square: one
    number), base_filters, num_layers, dropout_rate. Every trial is a full Ray Train run with
    train.num_workers workers."""

    name: str = "search"
    num_samples: int = 8
    max_concurrent_trials: int = 1
    space: dict[str, dict[str, tuple[float, ...]]] = field(default_factory=_default_space)
    searcher: str = "random"  # "random", or "optuna" (TPE; needs the optuna package)
    scheduler: str = "asha"  # "asha" stops weak trials at rungs of val_score; "fifo" runs all to the end
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: int = 2
    seed: int = 0
    # The floor a trial's best val_score must reach to be exported: below it a trial is "collapsed"
    # (below 0.1, the line under which the pipeline calls a model collapsed: next to no lesion found)
    # or "below floor", never the search's answer; a search whose best trial is below it exits 1 and
    # exports nothing. 0.1 by default, as what is good enough depends on the data: set it to what
    # the data's default run reaches (tune-demo: 0.5).
    min_score: float = 0.1
    # Run the base config's own values of the searched keys as the first trial (Tune's
    # points_to_evaluate; it takes one of num_samples), exported and scored on the test split beside
    # the best trial, so the summary says whether the search beat the default. Not with grid values.
    include_default: bool = True


@dataclass
class EvalConfig:
    batch_size: int = 4
    # mirroring test-time augmentation (export.LoadedExport): the export records it as its default for
    # evaluate --model and infer (whose --tta/--no-tta override it); pipeline, demo and crossval use it.
    # On: it raised test case Dice in the paired runs of `sweep --variants` (docs/performance.md)
    tta: bool = True
    # lesion voxels outside the brain removed (inference/brain_mask.py: the head model's intracranial
    # regions from HU): the export records it as its default for infer and evaluate --model (their
    # --brain-mask/--no-brain-mask override it); on: a lesion cannot lie in bone, scalp, orbit or air
    brain_mask: bool = True


@dataclass
class InferConfig:
    """What ``infer`` segments: a folder of images (PNG/JPG), or CT patients: a DICOM series folder,
    a NIfTI file, or a folder of them (``--input``)."""

    images_dir: str = ""
    output_dir: str = ""
    overlays: bool = True  # images: an overlays/ folder beside the masks
    probabilities: bool = False  # CT patients: also each case's lesion probability map as NIfTI
    # DICOM series inputs: also each case's mask as a DICOM SEG (cases/<case>/seg.dcm); off by default: a SEG
    # carries the source's patient and study identity (inference/dicom_seg.py)
    dicom_seg: bool = False
    uncertainty: bool = False  # CT patients: also each case's uncertainty map (normalised entropy) as NIfTI
    # CT patients on a Ray cluster (train.backend = "ray" and Ray there: RAY_ADDRESS, the pipeline's
    # training): Ray actors each loading the export once, one case at a time each;
    # 0: the cluster's GPUs, else half its CPUs, at most the number of cases. Without a cluster (or
    # backend "local") the cases run in this process unless this is set (a local Ray is then started).
    workers: int = 0


@dataclass
class RunConfig:
    """Names the run so that re-running it resumes from its latest checkpoint."""

    name: str = "flexunet"
    output_dir: str = "runs/flexunet"
    # MLflow tracking server (or store) URI the run is also logged to, e.g. http://mlflow:5000;
    # "" (default): no tracking, the run folder alone (see aisd_ray/report/track.py)
    mlflow_tracking_uri: str = ""
    # On a Ray cluster of more than one node a local path (output, shards) is refused unless it is
    # declared mounted at the same path on every node (NFS, Filestore): true, or --shared-fs.
    shared_filesystem: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(tomlable(self.to_dict()))


def tomlable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: tomlable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tomlable(v) for v in value]
    return value


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # aisd_ray/configs: the shipped TOMLs
LOSSES = ("ce", "dice", "ce_dice")
SHARD_FORMATS = ("parquet", "tfrecord")
ROW_ENCODINGS = ("png", "raw")
CHANNEL_MODES = ("grey", "neighbours", "windows", "symmetry")  # data.channels (aisd_ray/data/ct/channels.py)
MASK_VALUES = ("auto", "colours", "class_ids", "raw_labels")  # data.mask_values (aisd_ray/data/sources/masks.py)
BACKENDS = ("ray", "local")
# train.mixed_precision -> Keras dtype policy of the layers (the softmax head stays float32).
PRECISIONS = {"none": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
LR_SCHEDULES = ("plateau", "cosine", "constant")
ON_COLLAPSE = ("rollback", "stop", "ignore")
READERS = ("shards", "ray_data")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")  # Ray placement group strategies


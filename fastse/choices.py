"""Every list of choices of fastse, in one place: the values a setting, a flag or an argument may take.

The configs (`fastse.pretrain.config`, `fastse.semi.config`), the library modules that check an argument and the
command line (`click.Choice`) all read these tuples, so a choice added here is known everywhere at once.
This module imports nothing (not even the standard library): `fastse --help` and the configs read it
without importing torch.
"""

# ------------------------------------------------------------------ the teacher update (fastse.smoothing)
RULES: tuple[str, ...] = ("ema", "se", "sts")                      # rule: how a teacher fragment is updated
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "element")  # what a fragment is
BUFFER_MODES: tuple[str, ...] = ("keep", "copy", "ema")            # teacher buffers (BN statistics)
KERNELS: tuple[str, ...] = ("auto", "triton", "torch")             # the update's implementation

# ------------------------------------------------------------------------------------- models, data
ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "resnet101")  # torchvision ResNets (fastse.models)
DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "imagenet")  # published mean/std (pretraining, evaluation)
LOADERS: tuple[str, ...] = ("auto", "tensor", "dali")  # input pipeline backends (fastse.pipelines.loader)
AUGMENTATIONS: tuple[str, ...] = ("byol", "mocov2", "simclr")  # two-view recipes of pretraining (pipelines.recipes)

# ------------------------------------------------------------------------------------------- engine
DTYPES: tuple[str, ...] = ("bf16", "fp32")  # autocast dtype on CUDA
COMPILE_MODES: tuple[str, ...] = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch's
WANDB_MODES: tuple[str, ...] = ("auto", "online", "offline", "disabled")

# ------------------------------------------------------------- pretraining (fastse.pretrain.config)
METHODS: tuple[str, ...] = ("byol", "mocov2")
OPTIMIZERS: tuple[str, ...] = ("sgd", "lars")
MOMENTUM_SCHEDULES: tuple[str, ...] = ("cosine", "constant")
MONITORS: tuple[str, ...] = ("knn_top1", "probe_top1", "none")  # what the best/ checkpoint is chosen by
# the names of config.PRESETS
PRETRAIN_PRESETS: tuple[str, ...] = ("byol-cifar10", "mocov2-cifar10", "byol-imagenet", "mocov2-imagenet")

# ---------------------------------------------------------------------- FixMatch (fastse.semi.config)
SEMI_DATASETS: tuple[str, ...] = ("cifar10", "cifar100")
# the teacher runs no train-mode forwards: its BN statistics come from the student
SEMI_BUFFER_MODES: tuple[str, ...] = ("copy", "ema")
SEMI_MONITORS: tuple[str, ...] = ("teacher_acc", "student_acc", "none")  # best/ by this test top-1 (%)
SEMI_PRESETS: tuple[str, ...] = ("fixmatch-cifar10", "fixmatch-cifar100")  # the names of semi.config.PRESETS

# --------------------------------------------------------------------------- evaluation (fastse.eval)
LINEAR_PROTOCOLS: tuple[str, ...] = ("byol", "moco", "fast")  # the names of eval.linear.PROTOCOLS
WHICH: tuple[str, ...] = ("teacher", "student")  # which backbone of a run folder is evaluated

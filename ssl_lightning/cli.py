"""The ``ssl-lightning`` command: LightningCLI with a run directory per run and friendly errors.

    ssl-lightning fit --config experiments/fashion_mnist/simclr.yaml
    ssl-lightning fit --config runs/<run>/config.yaml --ckpt_path runs/<run>/checkpoints/last.ckpt
    ssl-lightning validate --config ... --ckpt_path ...
    ssl-lightning check-data --config experiments/...yaml   (reads every image first: ssl_lightning.data.check)

Every run writes into ``--run_dir`` (default ``runs/<method>-<dataset>-<time>``): the resolved
``config.yaml``, ``checkpoints/`` and the logger's files (W&B offline runs, CSV, TensorBoard): a
logger's relative ``save_dir`` is taken inside the run directory (``.`` = the run directory).
On SIGTERM / SIGUSR1 a run saves ``checkpoints/last.ckpt`` after the current batch, prints the resume
command and exits with 143 / 138 (:class:`~ssl_lightning.callbacks.PreemptionCheckpoint`).
"""
from __future__ import annotations

import os
import sys
import time

import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ssl_lightning.callbacks import ClusterMonitor, KNNMonitor, PreemptionCheckpoint
from ssl_lightning.data import SSLDataModule
from ssl_lightning.methods import SSLMethod
from ssl_lightning.modules import AllReduceSyncBatchNorm
from ssl_lightning.registry import SSLError


EPOCH_FILENAME = "epoch{epoch:03d}"  # checkpoints/epoch004.ckpt
MID_EPOCH_KEYS = ("every_n_train_steps", "train_time_interval")  # --checkpoint.*: periodic saves of last.ckpt
RESUME_COMMAND = "ssl-lightning fit --config {config} --ckpt_path {ckpt}"  # printed when a run is preempted


class RunDirConfig(SaveConfigCallback):
    """Saves the resolved ``fit`` config as ``<run_dir>/config.yaml`` whatever logger is used (other
    subcommands leave it alone, so ``fit --config <run_dir>/config.yaml --ckpt_path ...`` resumes)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved or stage != "fit":
            return
        path = os.path.join(trainer.default_root_dir, self.config_filename)
        if trainer.is_global_zero:
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
        self.already_saved = True
        self.save_config(trainer, pl_module, stage)  # lets loggers (W&B) record the config too


class SSLCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("save_config_callback", RunDirConfig)
        kwargs.setdefault("trainer_defaults", {"callbacks": [RichProgressBar(leave=True), LearningRateMonitor("step"),
                                                             ClusterMonitor(), PreemptionCheckpoint(
                                                                 resume_command=RESUME_COMMAND)]})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        argv = kwargs.get("args")
        data = _datamodule_class(sys.argv[1:] if argv is None else argv)
        super().__init__(SSLMethod, data, *args, subclass_mode_model=True, **kwargs)

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, dict):
            return super().parse_arguments(parser, args)
        # short method names resolved first; parsed directly (LightningCLI warns when given args and sys.argv)
        self.config = parser.parse_args(_resolve_methods(sys.argv[1:] if args is None else list(args)))

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Run directory (config, checkpoints, logs); default runs/<method>-<dataset>-<time>.")
        parser.add_lightning_class_args(KNNMonitor, "knn")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": EPOCH_FILENAME,
                             "checkpoint.auto_insert_metric_name": False})
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if not cfg.get("run_dir") and cfg.trainer.get("default_root_dir"):  # Lightning's name for it
            cfg.run_dir = cfg.trainer.default_root_dir
        if not cfg.get("run_dir") and (cfg.trainer.get("num_nodes") or 1) > 1:
            raise SSLError("A multi-node run needs --run_dir (on a directory every node sees, e.g. runs/<name>-$SLURM_JOB_ID): "
                           "each node would otherwise name its own runs/<method>-<dataset>-<time>, and a requeued "
                           "or restarted job would not find its checkpoints.")
        if not cfg.get("run_dir"):
            method = cfg.model.class_path.rsplit(".", 1)[-1].lower()
            cfg.run_dir = os.path.join("runs", f"{method}-{cfg.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg.trainer.default_root_dir = cfg.run_dir
        cfg.checkpoint.dirpath = cfg.checkpoint.dirpath or os.path.join(cfg.run_dir, "checkpoints")
        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        for logger in loggers:
            init = getattr(logger, "init_args", None)
            if init is not None and "save_dir" in init:
                init.save_dir = _inside(cfg.run_dir, init.save_dir or ".")

    def instantiate_classes(self) -> None:
        # --checkpoint.every_n_train_steps / train_time_interval with the default file names: saves of last.ckpt within
        # epochs, by the PreemptionCheckpoint; the ModelCheckpoint keeps its end-of-epoch saves (a ModelCheckpoint
        # does one or the other, and would leave the end of training unsaved). config.yaml keeps the settings.
        cfg = (self.config[self.subcommand] if self.subcommand else self.config).checkpoint
        self._mid_epoch = {}
        if cfg.filename == EPOCH_FILENAME and any(cfg.get(k) for k in MID_EPOCH_KEYS):
            self._mid_epoch = {k: cfg.get(k) for k in MID_EPOCH_KEYS}
            for k in MID_EPOCH_KEYS:
                setattr(cfg, k, None)
        try:
            super().instantiate_classes()
        finally:
            for k, v in self._mid_epoch.items():
                setattr(cfg, k, v)

    def instantiate_trainer(self, **kwargs):
        """The Trainer with the CLI's own callbacks (``--checkpoint`` ModelCheckpoint, ``--knn`` KNNMonitor,
        RichProgressBar, LearningRateMonitor, ClusterMonitor) less those that step aside for the user's
        settings (:func:`_steps_aside`); Lightning's refusals of a setting become one ``error:`` line."""
        trainer = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        given = trainer.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if trainer.get("barebones"):
            _check_barebones(trainer)
        extra = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        extra = [c for c in extra if not _steps_aside(c, trainer, given)]
        defaults = [c for c in self.trainer_defaults.get("callbacks", []) if not _steps_aside(c, trainer, given)]
        for c in defaults + given:  # --checkpoint.every_n_train_steps / train_time_interval: the PreemptionCheckpoint's
            for k, v in getattr(self, "_mid_epoch", {}).items():
                if isinstance(c, PreemptionCheckpoint) and getattr(c, k) is None:
                    setattr(c, k, v)
        self.trainer_defaults = {**self.trainer_defaults, "callbacks": defaults}
        _sync_batchnorm_on_cpu(trainer)
        try:
            return self._instantiate_trainer(trainer, extra)
        except SSLError:
            raise
        except (MisconfigurationException, ValueError, RuntimeError) as err:  # Lightning refusing a setting
            raise SSLError(f"Invalid trainer settings: {err} Change the trainer.* options or callbacks it names.") from err

    def after_fit(self) -> None:
        self._print_summary()
        _finish_wandb(self.trainer)

    def _print_summary(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        from rich.console import Console

        ckpt = trainer.checkpoint_callback
        saved = ckpt.last_model_path or ckpt.best_model_path if ckpt is not None else ""
        config = os.path.join(trainer.default_root_dir, "config.yaml")
        lines = [f"run directory : {trainer.default_root_dir}"]
        lines += [f"config        : {config}"] if os.path.isfile(config) else []  # not written by fast_dev_run
        lines += [f"checkpoint    : {saved}"] if saved and os.path.isfile(saved) else []  # none written
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "test/"))}
        if metrics:
            lines.append("final metrics : " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
        Console(soft_wrap=True).print("\n".join(lines), highlight=False)


def _sync_batchnorm_on_cpu(trainer: dict) -> None:
    """``sync_batchnorm: true`` on CPU: torch's SyncBatchNorm (Lightning's) refuses CPU tensors at the first step,
    so the layers get the global-batch statistics from :class:`~ssl_lightning.modules.AllReduceSyncBatchNorm`."""
    accelerator = str(trainer.get("accelerator") or "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not trainer.get("sync_batchnorm") or not on_cpu:
        return
    plugins = trainer.get("plugins") or []
    trainer["sync_batchnorm"] = False
    trainer["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]), AllReduceSyncBatchNorm()]


def _steps_aside(callback, trainer: dict, given: list) -> bool:
    """Whether one of the CLI's own callbacks stays out of this run: the user brought one of the same kind
    (``--trainer.callbacks``: theirs wins), or turned its feature off (``enable_checkpointing`` /
    ``enable_progress_bar`` false, ``logger`` false for the LearningRateMonitor), or asked for
    ``barebones`` (no checkpointing, progress bar or logging: none of them, nor the kNN / cluster monitors,
    whose only output is logged metrics)."""
    kind = ProgressBar if isinstance(callback, ProgressBar) else type(callback)
    if any(isinstance(c, kind) for c in given) or trainer.get("barebones"):
        return True
    off = {ModelCheckpoint: trainer.get("enable_checkpointing") is False,
           PreemptionCheckpoint: trainer.get("enable_checkpointing") is False,
           ProgressBar: trainer.get("enable_progress_bar") is False,
           LearningRateMonitor: trainer.get("logger") is False or trainer.get("logger") == []}
    return any(off_ and isinstance(callback, cls) for cls, off_ in off.items())


#: what ``barebones`` turns off: the trainer option, its "off" value and the flag that sets it
BAREBONES_OFF = (("logger", False, "--trainer.logger false"), ("enable_checkpointing", False, "--trainer.enable_checkpointing false"),
                 ("enable_progress_bar", False, "--trainer.enable_progress_bar false"),
                 ("enable_model_summary", False, "--trainer.enable_model_summary false"),
                 ("log_every_n_steps", 0, "--trainer.log_every_n_steps 0"),
                 ("num_sanity_val_steps", 0, "--trainer.num_sanity_val_steps 0"))


def _check_barebones(trainer: dict) -> None:
    """``--trainer.barebones true`` with a setting it turns off (a logger from the config, say): one error
    naming each such setting and the flags that turn them off (Lightning would raise at the first)."""
    clash = [(key, value, flag) for key, off, flag in BAREBONES_OFF
             if (value := trainer.get(key)) is not None and value != off]
    if clash:
        named = ", ".join(f"trainer.{key}={_shown(v)}" for key, v, _ in clash)
        raise SSLError(f"--trainer.barebones true turns off logging, checkpointing, the progress bar, the model summary "
                       f"and the sanity check, but these are set: {named}. Add {' '.join(f for _, _, f in clash)} "
                       "(or leave barebones off).")


def _shown(value) -> str:
    """A setting as a user reads it: ``20``, ``True``, ``WandbLogger``, ``[CSVLogger, WandbLogger]``."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_shown, value)) + "]"
    return repr(value) if isinstance(value, (bool, int, float, str)) else type(value).__name__


def _finish_wandb(trainer) -> None:
    """Close the run's W&B runs: a W&B run left open in this process would receive the logs of the next
    run started in it (a notebook, a test session)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


def _inside(run_dir: str, path: str) -> str:
    """``path`` taken relative to ``run_dir``, unless absolute or already inside it (a saved config)."""
    path, run_dir = os.path.normpath(path), os.path.normpath(run_dir)
    if os.path.isabs(path) or path == run_dir or path.startswith(run_dir + os.sep):
        return path
    return os.path.normpath(os.path.join(run_dir, path))


def _method_path(name: str) -> str:
    """A registered method name (``simclr``) or class name (``SimCLR``) -> its import path; a dotted
    path is left to jsonargparse; anything else is an unknown method."""
    from ssl_lightning.methods import METHODS

    if "." in name:
        return name
    by_class = {cls.__name__.lower(): cls for cls in (METHODS.get(n) for n in METHODS.names())}
    cls = by_class.get(name.lower()) or (METHODS.get(name) if name in METHODS else None)
    if cls is None:
        raise SSLError(f"Unknown method {name!r}. Registered methods: {', '.join(METHODS.names())}; "
                       "or give the import path of your own SSLMethod subclass (my_module.MyMethod).")
    return f"{cls.__module__}.{cls.__name__}"


def _datamodule_class(args) -> type:
    """The data module a run's method trains on: :class:`~ssl_lightning.data.SemiSupervisedDataModule` (its options
    under ``data:``) for the semi-supervised methods, :class:`~ssl_lightning.data.SSLDataModule` otherwise."""
    from ssl_lightning.data import SemiSupervisedDataModule
    from ssl_lightning.methods.semi_supervised import SemiSupervisedMethod

    if isinstance(args, dict):  # a parsed config: {"model": {"class_path": ...}, ...} (or under a subcommand)
        model = (args["fit"] if isinstance(args.get("fit"), dict) else args).get("model")
        name = model if isinstance(model, str) else (model or {}).get("class_path")
    else:
        name = _method_named(list(args))
    if not isinstance(name, str):
        return SSLDataModule
    try:
        from ssl_lightning.evaluation.checkpoint import resolve_method

        cls = resolve_method(name)
    except SSLError:  # reported by _resolve_methods when the arguments are parsed
        return SSLDataModule
    return SemiSupervisedDataModule if issubclass(cls, SemiSupervisedMethod) else SSLDataModule


def _method_named(args: list[str]) -> str | None:
    """The method the arguments name last (``--model`` / ``--model.class_path``, or a ``--config`` file's model)."""
    import yaml

    name = None
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        value = value if eq else (args[i + 1] if i + 1 < len(args) else None)
        if key in ("--model", "--model.class_path") and value and not value.startswith(("-", "{")):
            name = value
        elif key in ("--config", "-c") and value and os.path.isfile(value):
            model = (yaml.safe_load(open(value)) or {}).get("model")
            found = model if isinstance(model, str) else (model or {}).get("class_path")
            name = found if isinstance(found, str) else name
    return name


def _resolve_methods(args: list[str]) -> list[str]:
    """Checks the method named by ``--model``/``--model.class_path`` on the command line and by
    ``model``/``model.class_path`` in ``--config`` files, and accepts registered short names."""
    import yaml

    args = list(args)
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key in ("--model", "--model.class_path"):
            if eq:
                args[i] = f"{key}={_method_path(value)}"
            elif i + 1 < len(args) and not args[i + 1].startswith(("-", "{")):  # not an inline dict
                args[i + 1] = _method_path(args[i + 1])
        elif key in ("--config", "-c") and (value or i + 1 < len(args)):
            path = value or args[i + 1]
            if os.path.isfile(path):
                model = (yaml.safe_load(open(path)) or {}).get("model")
                name = model if isinstance(model, str) else (model or {}).get("class_path")
                if isinstance(name, str):
                    _method_path(name)  # raises for an unknown method
    return args


def _user_message(err: BaseException) -> str:
    """The user-facing line of an SSLError, also when a DataLoader worker wrapped it."""
    msg = str(err)
    marker = f"{SSLError.__name__}: "
    return msg.rsplit(marker, 1)[-1].strip() if "Original Traceback" in msg and marker in msg else msg


EVAL_COMMANDS = ("linear", "knn", "finetune", "cluster", "transfer", "export", "embed", "retrieve")


def main(args: list[str] | None = None) -> None:
    """``fit`` / ``validate`` / ...: LightningCLI; the evaluation commands: :mod:`ssl_lightning.evaluation.cli`."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv and argv[0] in EVAL_COMMANDS:
            from ssl_lightning.evaluation.cli import main as evaluate

            evaluate(argv)
        elif argv[:1] == ["check-data"]:
            from ssl_lightning.data.check import main as check_data

            sys.exit(check_data(argv[1:]))
        else:
            if argv[:1] in (["-h"], ["--help"]):
                print(f"Evaluation commands: {', '.join(EVAL_COMMANDS)}; reading every image before a run: "
                      "check-data (ssl-lightning <command> --help)\n")
            SSLCLI(args=args)
    except SSLError as err:
        print(f"error: {_user_message(err)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""The run: what configures it (the composition root), what it trains on, the loop, checkpoints and run folders.

    config.py       CatLossConfig and TrainConfig, and the checks that need more than one of their parts
    examples.py     Example and build_examples: every prompt encoded once before step 1
    batch.py        one micro-batch: drawn, shaped by the batch terms, evaluated by the objective
    loop.py         train(): the one loop (AdamW on the adapter, exact resume, clean stops)
    checkpoints.py  what a checkpoint holds, written atomically, read back safely
    run_folder.py   a run's folder is its own; a resume continues the run it says it continues
    header.py       the LoRA file header of a run: one function
    catversion.py   CatVersion's trainer: the loop with a CatVersion adapter
    budget.py, precision.py, threads.py, integrity.py, checks.py: memory before step 1, the compute dtype, CPU
                    threads, the shared model's checksum, input checks with errors that name the fix

May import every other part of the method (step, families, adapters, data, measure, terms); nothing of the
method imports it. The names below are the public ones (`from cat_train.training import train, TrainConfig`).
"""
from .batch import BatchSampler
from .catversion import CatVersionConfig, CatVersionResult, train_catversion
from .checkpoints import CHECKPOINT_FORMAT, checkpoint_path, latest_checkpoint, load_checkpoint
from .config import CatLossConfig, TrainConfig
from .examples import Example, build_examples
from .loop import StepInfo, TrainingDiverged, TrainingOutOfMemory, TrainResult, lr_factor, train

__all__ = ["BatchSampler", "CatVersionConfig", "CatVersionResult", "train_catversion", "CHECKPOINT_FORMAT",
           "checkpoint_path", "latest_checkpoint", "load_checkpoint", "CatLossConfig", "TrainConfig", "Example",
           "build_examples", "StepInfo", "TrainingDiverged", "TrainingOutOfMemory", "TrainResult", "lr_factor", "train"]
